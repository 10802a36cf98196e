"""The coordinator's processes: SuperLink behind the fleet proxy, and the runs launched on it.

``fl-server start`` runs, in the foreground (for systemd or a container), two children:

- ``flower-superlink`` (through server/superlink.py) on loopback only, with TLS (the federation's
  server certificate), node authentication (``--enable-supernode-auth``: only registered site keys
  may join), a persistent state database (sites reconnect with the same node id after a restart),
  runtime dependency installation off and telemetry off. Its Control API answers only requests
  carrying a token, and its Runtime API hands tasks only to the SuperExec holding a secret: both
  fresh at each start, 0600 under ``state/`` (server/superlink.py says why and how);
- nginx, the only listener hospitals can reach: mutual TLS, Fleet API only (server/proxy.py).

Before anything starts: the CRL is re-signed when due if ``pki/ca.key`` is in place (else a warning,
or a refusal once it has expired: nginx would refuse every site), and the folders holding state,
logs and the Control token are made private (0700, the database 0600). Once the SuperLink is up:
keys of removed sites still registered are unregistered, admitted sites whose key is not
registered yet are registered (after :func:`server.site_table.check_binding`), and nodes registered in the
SuperLink but not admitted by fedxray are reported. While running, logs are rotated by size.

``coordinator.json`` in the federation folder says what is running where; ``status``, ``admit``,
``remove`` and the run commands (``run``, ``resume``, ``stop-run``: server/runs.py) read it to talk
to the local SuperLink through its Control API (loopback, never through the proxy), with the
``flwr`` CLI and the token that ``fl-server start`` put in ``flwr-home/credentials.yaml``. Every
action on the federation is recorded in its audit log (server/audit.py).

The federation folder's layout is server/layout.py; the local auth, the `flwr` CLI and the
registered site keys are server/control_api.py; the supervisor loop is common/supervisor.py.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common.cache import atomic_write_bytes
from common.processes import free_port, offline_env, stop_process, wait_http
from common.supervisor import stop_requested, supervise
from server import pki
from server import sites as site_table
from server.audit import record_or_warn
from server.control_api import (
    list_nodes,
    prepare_local_auth,
    register_pending,
    superlink_command,
    unadmitted_nodes,
    unadmitted_warning,
    unregister,
    unregister_revoked,
)
from server.layout import CoordinatorError, Layout, run_dirs, running_state, source_root
from server.proxy import ProxyError, ProxyPaths, reload_proxy, start_proxy, write_conf

log = logging.getLogger("fedxray.server")


def refresh_crl(layout: Layout) -> str | None:
    """Re-sign the CRL if due and the CA key is here; else a warning line (None if nothing to say).

    Raises CoordinatorError when the CRL has expired and cannot be renewed here: nginx would start
    and refuse every site with it.
    """
    if pki.ca_key_present(layout.root) and pki.renew_crl(layout.root):
        return None
    warning = pki.crl_warning(layout.root)
    if warning and pki.crl_state(layout.root).days_left() <= 0:
        raise CoordinatorError(warning)
    return warning


def _warn(message: str) -> None:
    print(f"fl-server: warning: {message}", file=sys.stderr, flush=True)


def _audit(layout: Layout, event: str, /, **details: Any) -> None:
    """Record an event in the federation's audit log (server/audit.py); a failed write is a warning, the action stands."""
    record_or_warn(layout.root, event, **details)


def start(root: Path, *, listen_host: str = "0.0.0.0", listen_port: int | None = None,
          superlink_port: int | None = None, ready_file: Path | None = None) -> int:
    """Run the SuperLink and the fleet proxy until SIGTERM/SIGINT or until one of them dies."""
    layout = Layout(Path(root).resolve())
    federation = pki.load_federation(layout.root)
    if running_state(layout):
        raise CoordinatorError(f"a coordinator is already running for {layout.root} (see {layout.state_file}; its "
                               "SuperLink outlives a killed fl-server start): stop it first with `fl-server stop`")
    crl_note = refresh_crl(layout)
    if crl_note:
        _warn(crl_note)
    port = listen_port or int(str(federation["address"]).rsplit(":", 1)[1])
    superlink_port = superlink_port or free_port()
    layout.proxy_dir.mkdir(parents=True, exist_ok=True)
    prepare_local_auth(layout, superlink_port)
    env = offline_env(layout.flwr_home)
    env["PYTHONPATH"] = str(source_root()) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    superlink_log = layout.logs / "superlink.log"
    with open(superlink_log, "ab") as fh:  # append mode: rotate_log truncates it in place
        superlink = subprocess.Popen(superlink_command(layout, superlink_port), env=env, stdout=fh,
                                     stderr=subprocess.STDOUT, cwd=layout.root, start_new_session=True, umask=0o077)
    proxy = None
    stop_reason = "error at start"
    try:
        with stop_requested() as stopping:
            ctx = ssl.create_default_context(cafile=str(layout.pki / "ca.pem"))
            wait_http(f"https://localhost:{superlink_port}/health", superlink, 60.0, "the SuperLink", superlink_log, ctx)
            nodes = list_nodes(layout)
            for gone in unregister_revoked(layout, nodes):
                print(f"fl-server: unregistered the key of removed site {gone}", flush=True)
            refused: list[str] = []
            registered = register_pending(layout, refused=refused)
            for message in refused:
                _warn(message)
            for node in unadmitted_nodes(layout, list_nodes(layout)):
                _warn(unadmitted_warning(layout, node))
            paths = ProxyPaths(server_cert=layout.pki / "server.pem", server_key=layout.pki / "server.key",
                               ca_cert=layout.pki / "ca.pem", crl=layout.pki / "crl.pem", run_dir=layout.proxy_dir)
            conf = write_conf(paths, listen=f"{listen_host}:{port}", upstream=f"127.0.0.1:{superlink_port}")
            proxy = start_proxy(conf, layout.logs / "proxy.log")
            time.sleep(0.5)
            if proxy.poll() is not None:
                raise CoordinatorError(f"the fleet proxy (nginx) exited at start (port {port} in use?); see "
                                       f"{layout.proxy_dir / 'proxy-error.log'}")
            state = {"federation": federation.get("federation"), "address": federation["address"],
                     "listen": f"{listen_host}:{port}", "superlink": f"127.0.0.1:{superlink_port}",
                     "superlink_pid": superlink.pid, "proxy_pid": proxy.pid, "supervisor_pid": os.getpid(),
                     "proxy_conf": str(conf), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            atomic_write_bytes(layout.state_file, json.dumps(state, indent=2).encode())
            print(f"fl-server: coordinator up. Hospitals dial {federation['address']} (proxy on {listen_host}:{port}, "
                  f"mutual TLS, Fleet API only); SuperLink on 127.0.0.1:{superlink_port} with node authentication. "
                  f"{len(registered)} site key(s) registered now. Stop with Ctrl-C or `fl-server stop`.", flush=True)
            _audit(layout, "coordinator-started", federation=federation.get("federation"), address=federation["address"],
                   listen=f"{listen_host}:{port}", superlink_port=superlink_port, keys_registered=len(registered),
                   refused=len(refused))
            stop_reason = "stopped on request (SIGTERM/SIGINT)"
            if ready_file is not None:
                ready_file.write_text(json.dumps(state))
            exited = supervise({"superlink": superlink, "proxy": proxy}, layout.log_files(), stopping)
            if exited == "superlink":
                stop_reason = f"the SuperLink exited (code {superlink.returncode})"
                print(f"fl-server: the SuperLink exited (code {superlink.returncode}); see {superlink_log}",
                      file=sys.stderr)
                return 1
            if exited == "proxy":
                stop_reason = f"the fleet proxy exited (code {proxy.returncode})"
                print(f"fl-server: the fleet proxy exited (code {proxy.returncode}); see "
                      f"{layout.proxy_dir / 'proxy-error.log'}", file=sys.stderr)
                return 1
            return 0
    except RuntimeError as err:
        raise CoordinatorError(str(err)) from None
    finally:
        if proxy is not None:
            stop_process(proxy)
        stop_process(superlink)
        layout.state_file.unlink(missing_ok=True)
        _audit(layout, "coordinator-stopped", reason=stop_reason)


def stop(root: Path, timeout: float = 30.0) -> bool:
    """Ask a running ``fl-server start`` to stop; False when none is running."""
    layout = Layout(Path(root).resolve())
    state = running_state(layout)
    if state is None:
        return False
    _audit(layout, "coordinator-stop-requested")
    try:
        os.kill(int(state["supervisor_pid"]), signal.SIGTERM)
    except ProcessLookupError:  # its supervisor was killed: stop the orphaned SuperLink and proxy directly
        for key in ("proxy_pid", "superlink_pid"):
            try:
                os.killpg(int(state[key]), signal.SIGTERM)
            except (ProcessLookupError, KeyError):
                pass
        layout.state_file.unlink(missing_ok=True)
        return True
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and layout.state_file.exists():
        time.sleep(0.2)
    return True


def status(root: Path) -> dict[str, Any]:
    """Sites (admitted, registered, online), runs with their last round and epsilon per site, and warnings.

    ``unadmitted_nodes``: nodes the SuperLink has registered that no admitted site owns (see
    :func:`unadmitted_nodes`); ``crl``: the CRL's next-update; ``warnings``: one line each (the CRL
    expiring within a month, every unadmitted node), also printed by ``fl-server status``.
    """
    layout = Layout(Path(root).resolve())
    federation = pki.load_federation(layout.root)
    state = running_state(layout)
    nodes = list_nodes(layout) if state is not None else {}
    sites = []
    for site in site_table.list_sites(layout.root):
        node = nodes.get(int(site["node_id"])) if site.get("node_id") is not None else None
        sites.append({"site": site["site"], "revoked": bool(site.get("revoked")),
                      "registered": site.get("node_id") is not None,
                      "status": node["status"] if node else ("unknown" if state is None else "not registered")})
    runs = []
    if layout.runs.is_dir():
        for run_dir in sorted(run_dirs(layout), key=lambda p: p.stat().st_mtime):
            metrics = run_dir / "metrics.json"
            rounds = json.loads(metrics.read_text()).get("rounds", []) if metrics.is_file() else []
            last = rounds[-1] if rounds else {}
            runs.append({"run": run_dir.name, "rounds_done": len(rounds), "last_round": last.get("round"),
                         "pooled_auc": last.get("pooled_auc"), "epsilon": last.get("epsilon", {}),
                         "finished": (run_dir / "model.onnx").is_file()})
    crl = pki.crl_state(layout.root)
    unadmitted = unadmitted_nodes(layout, nodes)
    warnings = [w for w in [pki.crl_warning(layout.root)] if w] + [unadmitted_warning(layout, n) for n in unadmitted]
    return {"federation": federation.get("federation"), "address": federation["address"],
            "running": state is not None, "sites": sites, "unadmitted_nodes": unadmitted, "runs": runs,
            "crl": {"next_update": crl.next_update.isoformat(timespec="seconds"), "days_left": int(crl.days_left()),
                    "revoked": crl.revoked},
            "warnings": warnings}


def admit_site(root: Path, request: Path, out: Path | None = None) -> tuple[Path, bool]:
    """Sign a site's request (server/pki.py) and, when the coordinator runs, register its key now.

    Returns (kit folder, registered now). Otherwise the key is registered at the next start.
    """
    layout = Layout(Path(root).resolve())
    kit = site_table.admit(layout.root, request, out)
    site = site_table.read_request(request).site
    registered = False
    try:
        registered = bool(running_state(layout)) and bool(register_pending(layout))
    finally:  # the admission stands even if the registration failed: record it either way
        rec = next((r for r in site_table.list_sites(layout.root) if r["site"] == site and not r.get("revoked")), {})
        _audit(layout, "site-admitted", site=site, serial=rec.get("serial"), auth_key_sha256=rec.get("auth_key_sha256"),
               cert_sha256=rec.get("cert_sha256"), check_code=rec.get("check_code"),
               registered_now=registered)
    return kit, registered


def remove_site(root: Path, site: str) -> None:
    """Revoke the site's certificate, make the running proxy refuse it, then unregister its key.

    The door first: once nginx runs with the new CRL (new workers serving), the site's certificate
    is refused, and only then is its key unregistered, so there is no moment where the key is gone
    but the certificate still opens the door (its SuperNode would retry through it).
    """
    layout = Layout(Path(root).resolve())
    node_id = site_table.revoke(layout.root, site)
    serial = next((r.get("serial") for r in site_table.list_sites(layout.root) if r["site"] == site), None)
    done = {"proxy_reloaded": False, "unregistered_now": False}
    try:
        state = running_state(layout)
        if state is None:
            return
        try:
            reload_proxy(Path(state["proxy_conf"]), master_pid=int(state["proxy_pid"]))
            done["proxy_reloaded"] = True
        except ProxyError as err:
            if node_id is not None:
                unregister(layout, node_id)  # the key at least: Flower refuses the site even if nginx did not reload
                done["unregistered_now"] = True
            raise CoordinatorError(str(err)) from None
        if node_id is not None:
            unregister(layout, node_id)
            done["unregistered_now"] = True
    finally:  # the certificate is revoked whatever happened next: record it, with how far the rest got
        _audit(layout, "site-removed", site=site, serial=serial, node_id=node_id, **done)


def renew_crl(root: Path) -> bool:
    """Re-sign the CRL now (needs the CA key) and make a running proxy load it; True if a proxy reloaded."""
    layout = Layout(Path(root).resolve())
    pki.renew_crl(layout.root, force=True)
    state = running_state(layout)
    if state is None:
        _audit(layout, "crl-renewed", proxy_reloaded=False)
        return False
    try:
        reload_proxy(Path(state["proxy_conf"]), master_pid=int(state["proxy_pid"]))
    except ProxyError as err:
        _audit(layout, "crl-renewed", proxy_reloaded=False)
        raise CoordinatorError(str(err)) from None
    _audit(layout, "crl-renewed", proxy_reloaded=True)
    return True
