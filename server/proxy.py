"""The fleet proxy: the only door hospitals see, with mutual TLS, in front of the SuperLink.

Open-source Flower serves the Fleet API (what SuperNodes use), the Control API (start runs, that
is: run code at every site) and the Runtime API on one port, unauthenticated apart from node
keys, and verifies no client certificate. So the SuperLink listens on loopback only, and nginx
faces the hospitals:

- TLS with the federation's server certificate;
- a client certificate signed by the federation CA is required (and checked against the CRL
  that ``fl-server remove`` updates), so a stranger cannot even reach the Fleet API;
- only ``/v1/fleet/`` is forwarded (to the SuperLink over TLS, verified against the same CA);
  everything else, the Control and Runtime APIs included, gets 403;
- request bodies up to 16 MB (Flower sends arrays in 5 MiB chunks).

The same template renders the config for ``fl-server start`` and for ``deploy/``.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from common.processes import child_pids, stop_process

MAX_BODY = "16m"


class ProxyError(RuntimeError):
    """nginx is missing, its configuration is invalid, or it did not start."""


@dataclass(frozen=True)
class ProxyPaths:
    """Files the proxy reads (certificates) and the folder it writes (pid, logs, temp)."""

    server_cert: Path
    server_key: Path
    ca_cert: Path
    crl: Path
    run_dir: Path


def render_nginx_conf(paths: ProxyPaths, *, listen: str, upstream: str, upstream_name: str = "localhost",
                      daemon: bool = False) -> str:
    """nginx.conf for the fleet proxy. ``listen`` is host:port for hospitals, ``upstream`` the SuperLink."""
    run = paths.run_dir
    return f"""# fedxray fleet proxy: rendered by server/proxy.py. Hospitals reach only /v1/fleet/, with a client
# certificate from the federation CA. The SuperLink's Control and Runtime APIs stay on loopback.
worker_processes 1;
daemon {"on" if daemon else "off"};
pid {run}/nginx.pid;
error_log {run}/proxy-error.log warn;

events {{
    worker_connections 512;
}}

http {{
    # Site identity (certificate subject) and request line only: no patient data travels in URLs.
    log_format fleet '$time_iso8601 $remote_addr "$ssl_client_s_dn" "$request" $status $body_bytes_sent '
                     '$request_time';
    access_log {run}/proxy-access.log fleet;
    client_body_temp_path {run}/tmp/body;
    proxy_temp_path {run}/tmp/proxy;
    fastcgi_temp_path {run}/tmp/fastcgi;
    uwsgi_temp_path {run}/tmp/uwsgi;
    scgi_temp_path {run}/tmp/scgi;
    server_tokens off;

    upstream superlink {{
        server {upstream};
        keepalive 8;
    }}

    server {{
        listen {listen} ssl;
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_certificate {paths.server_cert};
        ssl_certificate_key {paths.server_key};

        # Mutual TLS: only certificates signed by the federation CA and not revoked.
        ssl_client_certificate {paths.ca_cert};
        ssl_verify_client on;
        ssl_verify_depth 1;
        ssl_crl {paths.crl};

        # Bodies stream straight to the SuperLink and answers straight back: no temp files, so the
        # workers (an unprivileged user when nginx starts as root) need no writable folder.
        client_max_body_size {MAX_BODY};
        proxy_request_buffering off;
        proxy_buffering off;
        proxy_max_temp_file_size 0;

        location /v1/fleet/ {{
            proxy_pass https://superlink;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host {upstream_name};
            proxy_ssl_trusted_certificate {paths.ca_cert};
            proxy_ssl_verify on;
            proxy_ssl_name {upstream_name};
            proxy_ssl_server_name on;
            proxy_read_timeout 600s;
            proxy_send_timeout 600s;
        }}

        # Control API (/v1/control: starts runs, i.e. runs code at every site), Runtime API and
        # anything else: never from outside.
        location / {{
            return 403 "fedxray: only the Fleet API is served here\\n";
        }}
    }}
}}
"""


def nginx_binary() -> str:
    """Path of nginx, or a ProxyError that says how to install it."""
    for candidate in (shutil.which("nginx"), "/usr/sbin/nginx"):
        if candidate and Path(candidate).is_file():
            return candidate
    raise ProxyError("nginx is not installed: install it (Debian/Ubuntu: apt-get install nginx-light) and run again")


def write_conf(paths: ProxyPaths, **kwargs) -> Path:
    """Render, write and validate (``nginx -t``) the proxy config; returns its path."""
    for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (paths.run_dir / "tmp" / sub).mkdir(parents=True, exist_ok=True)
    conf = paths.run_dir / "nginx.conf"
    tmp = conf.with_suffix(".tmp")
    tmp.write_text(render_nginx_conf(paths, **kwargs))
    tmp.replace(conf)
    check = subprocess.run([nginx_binary(), "-t", "-q", "-p", str(paths.run_dir), "-c", str(conf)],
                           capture_output=True, text=True)
    if check.returncode != 0:
        raise ProxyError(f"the fleet proxy configuration is invalid: {check.stderr.strip().splitlines()[-1:]}")
    return conf


def start_proxy(conf: Path, log_path: Path) -> subprocess.Popen:
    """Start nginx in the foreground as a child (stopped with ``stop_process``)."""
    with open(log_path, "ab") as fh:
        return subprocess.Popen([nginx_binary(), "-p", str(conf.parent), "-c", str(conf)], stdout=fh,
                                stderr=subprocess.STDOUT, start_new_session=True)


def reload_proxy(conf: Path, master_pid: int | None = None, timeout: float = 15.0) -> None:
    """Re-read certificates and the CRL (after ``fl-server remove``) without dropping connections.

    ``nginx -s reload`` only signals the master and returns; a master that cannot load the new
    configuration (an unreadable CRL, say) logs it and keeps serving the old one. With
    ``master_pid`` this returns only once a worker started after the reload exists (the new
    configuration is in force), and raises a ProxyError otherwise.
    """
    before = child_pids(master_pid) if master_pid is not None else set()
    result = subprocess.run([nginx_binary(), "-p", str(conf.parent), "-c", str(conf), "-s", "reload"], check=False,
                            capture_output=True, text=True)
    if result.returncode != 0:
        detail = (result.stderr.strip().splitlines() or ["no message"])[-1]
        raise ProxyError(f"the fleet proxy did not reload ({detail}): it still serves the old CRL; fix the cause and "
                         "run the command again, or restart fl-server start")
    if master_pid is None:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child_pids(master_pid) - before:
            return
        time.sleep(0.1)
    raise ProxyError(f"the fleet proxy did not take the new configuration within {timeout:.0f} s (see "
                     f"{conf.parent / 'proxy-error.log'}): it still serves the old CRL; restart fl-server start")


__all__ = ["ProxyError", "ProxyPaths", "render_nginx_conf", "write_conf", "start_proxy", "reload_proxy",
           "stop_process"]
