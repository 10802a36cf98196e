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
"""

from __future__ import annotations

import base64
import json
import logging
import os
import signal
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.bundle import BundleError, project_root
from common.cache import atomic_write_bytes, atomic_write_durable
from common.processes import free_port, offline_env, process_alive, rotate_log, stop_process, wait_http, write_local_secret
from server import pki
from server import sites as site_table
from server.audit import record_coordinator
from server.proxy import ProxyError, ProxyPaths, reload_proxy, start_proxy, write_conf

log = logging.getLogger("fedxray.server")

STATE_FILE = "coordinator.json"
CONNECTION = "fedxray"
#: Node statuses of `flwr supernode list` for a key that is no longer registered.
UNREGISTERED = ("unregistered", "deleted")


class CoordinatorError(RuntimeError):
    """Something the operator must fix; the message is one line that says what and how."""


@dataclass(frozen=True)
class Layout:
    """Where the coordinator keeps everything, under the federation folder made by ``fl-server init``."""

    root: Path

    @property
    def pki(self) -> Path:
        return self.root / "pki"

    @property
    def state_db(self) -> Path:
        return self.root / "state" / "superlink.db"

    @property
    def control_token(self) -> Path:
        """The Control API's bearer token (0600), new at each start."""
        return self.root / "state" / "control.token"

    @property
    def superexec_secret(self) -> Path:
        """The secret the SuperLink and its SuperExec share (0600), new at each start."""
        return self.root / "state" / "superexec.secret"

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    @property
    def flwr_home(self) -> Path:
        return self.root / "flwr-home"

    @property
    def proxy_dir(self) -> Path:
        return self.root / "proxy"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def state_file(self) -> Path:
        return self.root / STATE_FILE

    def log_files(self) -> list[Path]:
        """Every log fedxray or nginx appends to, rotated by size while the coordinator runs."""
        return [self.logs / "superlink.log", self.logs / "proxy.log", self.proxy_dir / "proxy-error.log",
                self.proxy_dir / "proxy-access.log"]


def make_private(layout: Layout) -> None:
    """State, logs, runs and the flwr CLI's home: 0700; the SuperLink's database files 0600.

    Other users of the coordinator host must not read the state database (registered keys, runs),
    the Control token, the models or the logs. Folders made by an earlier fedxray are tightened too.
    """
    for folder in (layout.state_db.parent, layout.runs, layout.logs, layout.flwr_home):
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(folder, 0o700)
    for path in layout.state_db.parent.glob(layout.state_db.name + "*"):  # the database, -wal, -shm
        os.chmod(path, 0o600)


def _write_flwr_config(layout: Layout, superlink_port: int) -> None:
    """The `flwr` CLI's connection to the local SuperLink, and its login: the Control token.

    The connection goes to loopback with TLS verified against the federation CA. The token is
    stored where Flower's CLI keeps account tokens (``credentials.yaml``, as an ``oidc`` login), so
    the stock CLI sends it as ``Authorization: Bearer``; no other local user can read it (0600 in
    a 0700 folder).
    """
    layout.flwr_home.mkdir(mode=0o700, parents=True, exist_ok=True)
    (layout.flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        f'address = "127.0.0.1:{superlink_port}"\nroot-certificates = "{layout.pki / "ca.pem"}"\n'
    )
    host = f"127.0.0.1:{superlink_port}"
    token = layout.control_token.read_bytes().strip()
    entries = {"authn-type": b"oidc", "oidc-access-token": token, "oidc-refresh-token": b"none"}
    credentials = {f"flower.account-auth.{host}.{key}": base64.b64encode(value).decode() for key, value in entries.items()}
    atomic_write_durable(layout.flwr_home / "credentials.yaml", json.dumps(credentials).encode(), 0o600)  # JSON is YAML


def superlink_command(layout: Layout, superlink_port: int) -> list[str]:
    """The SuperLink as ``fl-server start`` runs it (server/superlink.py adds the local-API protection)."""
    return [sys.executable, "-m", "server.superlink",
            "--control-token-file", str(layout.control_token), "--superexec-secret-file", str(layout.superexec_secret),
            "--ssl-certfile", str(layout.pki / "server.pem"), "--ssl-keyfile", str(layout.pki / "server.key"),
            "--ssl-ca-certfile", str(layout.pki / "ca.pem"),
            "--enable-supernode-auth", "--database", str(layout.state_db),
            "--disable-runtime-dependency-installation",
            "--host", "127.0.0.1", "--port", str(superlink_port)]


def prepare_local_auth(layout: Layout, superlink_port: int) -> None:
    """Private folders, a new Control token and SuperExec secret, and the `flwr` CLI's connection."""
    make_private(layout)
    write_local_secret(layout.control_token)
    write_local_secret(layout.superexec_secret)
    _write_flwr_config(layout, superlink_port)


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


def running_state(layout: Layout) -> dict[str, Any] | None:
    """coordinator.json if its SuperLink process is alive, else None."""
    if not layout.state_file.is_file():
        return None
    state = json.loads(layout.state_file.read_text())
    try:
        return state if _alive(int(state["superlink_pid"])) else None
    except (KeyError, ValueError):
        return None


def _alive(pid: int) -> bool:
    """True while ``pid`` runs; a killed process not yet reaped (a zombie) counts as gone."""
    return process_alive(pid)


def flwr(layout: Layout, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
    """Run a `flwr` CLI command against the local SuperLink's Control API."""
    env = offline_env(layout.flwr_home)
    return subprocess.run(["flwr", *args], env=env, capture_output=True, text=True, timeout=timeout,
                          cwd=layout.root)


def _json_out(proc: subprocess.CompletedProcess) -> dict[str, Any]:
    text = proc.stdout.strip()
    start = text.find("{")
    if start < 0:
        raise CoordinatorError(f"`flwr` gave no JSON (exit {proc.returncode}): {_one_line(proc.stderr or text)[-300:]}")
    return json.loads(text[start:])


def _one_line(text: object) -> str:
    """Flower's CLI messages span lines; fedxray's errors are one line."""
    return " ".join(str(text).split())


def list_nodes(layout: Layout) -> dict[int, dict[str, Any]]:
    """The SuperLink's nodes by node id (``flwr supernode list``), unregistered ones included."""
    out = _json_out(flwr(layout, "supernode", "list", CONNECTION, "--format", "json"))
    if not out.get("success", True):
        raise CoordinatorError(f"could not list the SuperLink's nodes: {_one_line(out.get('error-message', out))} "
                               "(run fl-server as the coordinator's service user)")
    return {int(node["node-id"]): node for node in out.get("nodes", [])}


def register_pending(layout: Layout, *, refused: list[str] | None = None) -> list[str]:
    """Register every admitted, not yet registered site key with the running SuperLink.

    Each key is checked first (:func:`server.site_table.check_binding`). A key that fails raises
    CoordinatorError, or, when a ``refused`` list is given (``fl-server start``), is skipped and its
    one-line reason appended there, so one tampered site does not keep the others out.
    """
    done = []
    for site in site_table.pending_registrations(layout.root):
        try:
            site_table.check_binding(layout.root, site["site"])
        except pki.ProvisionError as err:
            if refused is None:
                raise CoordinatorError(str(err)) from None
            refused.append(str(err))
            continue
        pub = layout.root / "sites" / site["site"] / "auth.pub"
        out = _json_out(flwr(layout, "supernode", "register", str(pub), CONNECTION, "--name", site["site"],
                             "--format", "json"))
        if not out.get("success"):
            raise CoordinatorError(f"could not register site {site['site']}: {_one_line(out.get('error-message', out))}")
        site_table.record_node_id(layout.root, site["site"], int(out["node-id"]))
        done.append(site["site"])
    return done


def unregister(layout: Layout, node_id: int) -> None:
    out = _json_out(flwr(layout, "supernode", "unregister", str(node_id), CONNECTION, "--format", "json"))
    if not out.get("success"):
        raise CoordinatorError(f"could not unregister node {node_id}: {_one_line(out.get('error-message', out))}")


def unregister_revoked(layout: Layout, nodes: dict[int, dict[str, Any]] | None = None) -> list[str]:
    """Unregister the keys of removed sites that the SuperLink still has (e.g. removed while stopped)."""
    nodes = list_nodes(layout) if nodes is None else nodes
    done = []
    for gone in site_table.revoked_registrations(layout.root):
        node = nodes.get(gone["node_id"])
        if node is not None and node.get("status") not in UNREGISTERED:
            unregister(layout, gone["node_id"])
            done.append(f"{gone['site']} (node {gone['node_id']})")
    return done


def unadmitted_nodes(layout: Layout, nodes: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    """Nodes registered in the SuperLink that no admitted site owns: registered behind fedxray's back.

    Each item: {node_id, status, removed_site (the removed site whose key it was, or null)}.
    """
    admitted = {int(r["node_id"]) for r in site_table.list_sites(layout.root) if not r.get("revoked") and r.get("node_id") is not None}
    removed = {r["node_id"]: r["site"] for r in site_table.revoked_registrations(layout.root)}
    return [{"node_id": node_id, "status": node.get("status"), "removed_site": removed.get(node_id)}
            for node_id, node in sorted(nodes.items())
            if node_id not in admitted and node.get("status") not in UNREGISTERED]


def unadmitted_warning(layout: Layout, node: dict[str, Any]) -> str:
    """One line for a node that fedxray did not admit, with the command that removes it."""
    whose = (f"the key of removed site {node['removed_site']}" if node["removed_site"]
             else "a key no admitted site owns")
    return (f"node {node['node_id']} ({node['status']}) is registered in the SuperLink with {whose}: remove it with "
            f"FLWR_HOME={layout.flwr_home} flwr supernode unregister {node['node_id']} {CONNECTION}, "
            "and find out who registered it")


def _warn(message: str) -> None:
    print(f"fl-server: warning: {message}", file=sys.stderr, flush=True)


def _audit(layout: Layout, event: str, /, **details: Any) -> None:
    """Record an event in the federation's audit log (server/audit.py); a failed write is a warning, the action stands."""
    problem = record_coordinator(layout.root, event, **details)
    if problem:
        _warn(f"audit log: {problem}")


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
    env["PYTHONPATH"] = str(_project_root()) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    superlink_log = layout.logs / "superlink.log"
    with open(superlink_log, "ab") as fh:  # append mode: rotate_log truncates it in place
        superlink = subprocess.Popen(superlink_command(layout, superlink_port), env=env, stdout=fh,
                                     stderr=subprocess.STDOUT, cwd=layout.root, start_new_session=True, umask=0o077)
    proxy = None
    stopping = {"flag": False}
    stop_reason = "error at start"

    def _stop(signum, frame):  # noqa: ANN001
        stopping["flag"] = True

    old = {s: signal.signal(s, _stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
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
        while not stopping["flag"]:
            if superlink.poll() is not None:
                stop_reason = f"the SuperLink exited (code {superlink.returncode})"
                print(f"fl-server: the SuperLink exited (code {superlink.returncode}); see {superlink_log}",
                      file=sys.stderr)
                return 1
            if proxy.poll() is not None:
                stop_reason = f"the fleet proxy exited (code {proxy.returncode})"
                print(f"fl-server: the fleet proxy exited (code {proxy.returncode}); see "
                      f"{layout.proxy_dir / 'proxy-error.log'}", file=sys.stderr)
                return 1
            for path in layout.log_files():
                rotate_log(path)
            time.sleep(0.5)
        return 0
    except RuntimeError as err:
        raise CoordinatorError(str(err)) from None
    finally:
        for s, h in old.items():
            signal.signal(s, h)
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


def require_running(layout: Layout) -> dict[str, Any]:
    state = running_state(layout)
    if state is None:
        raise CoordinatorError(f"no coordinator is running for {layout.root}: start it with `fl-server start --dir "
                               f"{layout.root}`")
    return state


def _project_root() -> Path:
    try:
        return project_root()
    except BundleError as err:
        raise CoordinatorError(str(err)) from None


def run_dirs(layout: Layout) -> list[Path]:
    """The run folders under ``runs/`` (a run writes ``run-id`` first); not the tracking store kept beside them."""
    if not layout.runs.is_dir():
        return []
    return sorted(p for p in layout.runs.iterdir()
                  if p.is_dir() and any((p / name).exists() for name in ("run-id", "metrics.json", "checkpoints")))


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
