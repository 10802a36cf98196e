"""``fl-client start``: join the federation from a hospital, outbound only, checking everything first.

Order of work, each step with one clear line when it fails:

1. the site's identity (keys from ``fl-client init``, kit from the coordinator) is complete;
2. the data folder is read the way training reads it, and the same summary as ``fl-client check``
   is printed (counts only: no identifiers, no paths);
3. a probe of the coordinator: TCP reachable, the coordinator's certificate signed by the
   federation CA, this site's certificate accepted by the proxy (mutual TLS);
4. two children: fedxray's launcher of approved bundles (client/approval.py) and the SuperNode
   (client/supernode.py, which presents the site certificate), with ``--isolation process`` so
   that only the launcher ever starts app code. The hospital opens no port: the SuperNode's
   Runtime API listens on loopback, and only the launcher can take tasks from it (a fresh shared
   secret per start, ``STATE/runtime-api.secret``, 0600: Flower's SuperExec authentication).
   Both children stop by themselves when ``fl-client start`` is gone, even after a ``kill -9``.
   They run with umask 077: what they and the ClientApps write (ledger, replies, cache, logs) is
   readable by the site's service user only. Their logs are rotated by size (5 x 10 MB kept).

The SuperNode retries the coordinator without limit, so a coordinator restart is survived (its
state database gives the site the same node id back). A refused key ends the SuperNode with
Flower's exit code 305, reported here in words.
"""

from __future__ import annotations

import http.client
import os
import re
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from common.bundle import packages_root
from common.config_fields import to_toml
from common.processes import free_port, offline_env, stop_process, write_local_secret
from common.site_config import SiteConfig
from common.supervisor import stop_requested, supervise

AUTH_REFUSED_EXIT = 305
#: The shared secret of the SuperNode's Runtime API and the bundle launcher, new at every start.
RUNTIME_SECRET_FILE = "runtime-api.secret"
LOG_FILES = ("supernode.log", "launcher.log")


class JoinError(RuntimeError):
    """The site cannot join; the message is one line naming the problem and the fix."""


@dataclass(frozen=True)
class Probe:
    """What the coordinator answered to an authenticated request on the Fleet API."""

    status: int
    detail: str


def probe_coordinator(address: str, ca_cert: Path, client_cert: Path, client_key: Path, timeout: float = 10.0) -> Probe:
    """Open a mutual-TLS connection to the fleet proxy and send one harmless Fleet API request."""
    host, _, port_text = address.rpartition(":")
    if not host or not port_text.isdigit():
        raise JoinError(f"coordinator address '{address}' is not HOST:PORT (e.g. coordinator.example.org:9443)")
    host = host.strip("[]")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(cafile=str(ca_cert))
    try:
        ctx.load_cert_chain(certfile=str(client_cert), keyfile=str(client_key))
    except ssl.SSLError as err:
        raise JoinError(f"client.pem and tls.key do not belong together ({err.reason}): copy the client.pem of YOUR kit "
                        "into the site folder, or run fl-client init again and ask for a new kit") from None
    conn = http.client.HTTPSConnection(host, int(port_text), context=ctx, timeout=timeout)
    try:
        conn.request("POST", "/v1/fleet/fedxray-probe", body=b"", headers={"content-type": "application/protobuf"})
        resp = conn.getresponse()
        body = resp.read(400).decode(errors="replace")
    except ssl.SSLCertVerificationError as err:
        raise JoinError(f"the coordinator at {address} presented a certificate that this site's ca.pem does not trust "
                        f"({err.verify_message}): check the address, or ask the coordinator for the federation's ca.pem"
                        ) from None
    except ssl.SSLError as err:
        raise JoinError(f"TLS with the coordinator at {address} failed ({err.reason}): the coordinator refused this "
                        "site's certificate (revoked, expired or from another federation); ask for a new kit") from None
    except (ConnectionRefusedError, TimeoutError, socket.gaierror, OSError) as err:
        reason = getattr(err, "strerror", None) or type(err).__name__
        raise JoinError(f"cannot reach the coordinator at {address} ({reason}): check the address and that the hospital "
                        f"firewall allows outbound TCP to port {port_text}") from None
    finally:
        conn.close()
    if resp.status == 400 and "certificate" in body.lower():
        raise JoinError(f"the coordinator at {address} rejected this site's certificate (revoked, expired or from "
                        "another federation): ask the coordinator for a new kit")
    if resp.status == 403:
        raise JoinError(f"the coordinator at {address} refused the Fleet API request (403): check the address points "
                        "at the fleet proxy")
    return Probe(resp.status, body[:100])


def write_node_config(state_dir: Path, data_dir: Path, site: str, max_epsilon: float, delta: float,
                      allow_no_dp: bool, device: str, extra: dict[str, str] | None = None) -> Path:
    """The SuperNode's node-config file: what the ClientApp reads as this site's settings.

    ``extra`` holds the site's other settings (``--site-setting KEY=VALUE``: val-fraction, eval-noise,
    max-evaluations and the run ranges it accepts), validated with the rest by SiteConfig.
    """
    values = {"data-dir": str(data_dir), "state-dir": str(state_dir), "site-name": site, "max-epsilon": max_epsilon,
              "delta": delta, "allow-no-dp": allow_no_dp, "device": device}
    typed = SiteConfig.from_mapping({**values, **(extra or {})}).to_mapping()
    values.update({k: typed[k] for k in (extra or {})})
    SiteConfig.from_mapping(values)  # one validation place: bad values fail here, before anything starts
    path = state_dir / "node-config.toml"
    path.write_text(to_toml(values))
    return path


def _flower_exit_code(log_path: Path, offset: int = 0) -> int | None:
    """Flower's own exit code, from the last "Exit Code: N" line of the SuperNode log.

    The process status is not reliable (Flower's exit handlers end the process with 1), so the
    log line is what says that the coordinator refused the key (305).
    """
    try:
        data = log_path.read_bytes()
    except OSError:
        return None
    tail = data[offset if offset <= len(data) else 0:][-20000:].decode(errors="replace")  # 0: rotated since
    codes = re.findall(r"Exit Code: (\d+)", tail)
    return int(codes[-1]) if codes else None


def run_site(*, identity, address: str, data_dir: Path, state_dir: Path, node_config: Path,
             log=print, stop_after: float | None = None, rejoin_wait: float = 150.0) -> int:
    """Start the approved-bundle launcher and the SuperNode; supervise until stopped or one exits.

    A refused activation (Flower's 305) right after a crash is usually the site's previous session,
    which the SuperLink keeps until its heartbeats run out (about a minute): the SuperNode is started
    again for up to ``rejoin_wait`` seconds before the refusal is reported as a key problem.
    """
    logs = state_dir / "logs"
    logs.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(logs, 0o700)
    env = offline_env()
    root = str(packages_root())
    env["PYTHONPATH"] = root + (":" + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    started = time.monotonic()
    procs: list[subprocess.Popen] = []
    try:
        with stop_requested() as stopping:
            def stop() -> bool:
                return stopping() or (stop_after is not None and time.monotonic() - started > stop_after)

            while True:
                supernode, guard, log_offset = _start_site_processes(identity, address, state_dir, node_config, logs, env)
                procs = [guard, supernode]
                exited = supervise({"supernode": supernode, "launcher": guard}, [logs / name for name in LOG_FILES], stop)
                if exited is None:
                    return 0
                if exited == "launcher":
                    log(f"fl-client: the bundle launcher stopped (exit {guard.returncode}); see {logs / 'launcher.log'}")
                    return 1
                code = _flower_exit_code(logs / "supernode.log", log_offset) or supernode.returncode
                for proc in procs:
                    stop_process(proc)
                if code == AUTH_REFUSED_EXIT and time.monotonic() - started < rejoin_wait and not stopping():
                    log("fl-client: the coordinator refused to activate this site; retrying (after a crash the "
                        "previous session stays open for about a minute)")
                    time.sleep(10)
                    continue
                if code == AUTH_REFUSED_EXIT:
                    log(f"fl-client: the coordinator refused this site's authentication key (exit {code}): ask the "
                        "coordinator to admit your request (fl-server admit) or to register the key again; check "
                        "that auth.key is the one fl-client init made")
                    return 3
                log(f"fl-client: the SuperNode stopped (exit {code}); see {logs / 'supernode.log'}")
                return 1
    finally:
        for proc in procs:
            stop_process(proc)


def _start_site_processes(identity, address: str, state_dir: Path, node_config: Path, logs: Path,
                          env: dict[str, str]) -> tuple[subprocess.Popen, subprocess.Popen, int]:
    """The SuperNode (site certificate, auth key, process isolation) and the approved-bundle launcher."""
    runtime_port = free_port()
    secret = write_local_secret(state_dir / RUNTIME_SECRET_FILE)
    supernode_cmd = [sys.executable, "-m", "client.supernode", "--client-cert", str(identity.client_cert),
                     "--client-key", str(identity.tls_key), "--parent-pid", str(os.getpid()), "--",
                     "--superlink", address, "--root-certificates", str(identity.ca_cert),
                     "--auth-supernode-private-key", str(identity.auth_key),
                     "--isolation", "process", "--host", "127.0.0.1", "--port", str(runtime_port),
                     "--superexec-auth-secret-file", str(secret), "--node-config", str(node_config)]
    log_offset = (logs / "supernode.log").stat().st_size if (logs / "supernode.log").exists() else 0
    with open(logs / "supernode.log", "ab") as fh:
        supernode = subprocess.Popen(supernode_cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, cwd=state_dir,
                                     start_new_session=True, umask=0o077)
    guard_cmd = [sys.executable, "-m", "client.approval", "guard", "--runtime-api-address",
                 f"127.0.0.1:{runtime_port}", "--state-dir", str(state_dir), "--parent-pid", str(supernode.pid),
                 "--superexec-auth-secret-file", str(secret)]
    with open(logs / "launcher.log", "ab") as fh:
        guard = subprocess.Popen(guard_cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, cwd=state_dir,
                                 start_new_session=True, umask=0o077)
    return supernode, guard, log_offset
