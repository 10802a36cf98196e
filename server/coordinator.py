"""The coordinator's processes: SuperLink behind the fleet proxy, and the runs launched on it.

``fl-server start`` runs, in the foreground (for systemd or a container), two children:

- ``flower-superlink`` on loopback only, with TLS (the federation's server certificate), node
  authentication (``--enable-supernode-auth``: only registered site keys may join), a persistent
  state database (sites reconnect with the same node id after a restart), runtime dependency
  installation off and telemetry off;
- nginx, the only listener hospitals can reach: mutual TLS, Fleet API only (server/proxy.py).

Admitted sites whose key is not registered yet are registered as soon as the SuperLink is up.
``coordinator.json`` in the federation folder says what is running where; ``fl-server run``,
``status``, ``resume``, ``admit`` and ``remove`` read it to talk to the local SuperLink through its
Control API (loopback, never through the proxy).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.bundle import BundleError, project_root, stage_app
from common.cache import atomic_write_bytes
from common.config import to_toml
from common.processes import free_port, offline_env, stop_process, wait_http
from server import pki
from server.proxy import ProxyPaths, reload_proxy, start_proxy, write_conf

log = logging.getLogger("fedxray.server")

STATE_FILE = "coordinator.json"
CONNECTION = "fedxray"


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


def _write_flwr_config(layout: Layout, superlink_port: int) -> None:
    """The `flwr` CLI's connection to the local SuperLink: loopback, TLS verified against the federation CA."""
    layout.flwr_home.mkdir(parents=True, exist_ok=True)
    (layout.flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        f'address = "127.0.0.1:{superlink_port}"\nroot-certificates = "{layout.pki / "ca.pem"}"\n'
    )


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
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def flwr(layout: Layout, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
    """Run a `flwr` CLI command against the local SuperLink's Control API."""
    env = offline_env(layout.flwr_home)
    return subprocess.run(["flwr", *args], env=env, capture_output=True, text=True, timeout=timeout,
                          cwd=layout.root)


def _json_out(proc: subprocess.CompletedProcess) -> dict[str, Any]:
    text = proc.stdout.strip()
    start = text.find("{")
    if start < 0:
        raise CoordinatorError(f"`flwr` gave no JSON (exit {proc.returncode}): {(proc.stderr or text).strip()[-300:]}")
    return json.loads(text[start:])


def register_pending(layout: Layout) -> list[str]:
    """Register every admitted, not yet registered site key with the running SuperLink."""
    done = []
    for site in pki.pending_registrations(layout.root):
        pub = layout.root / "sites" / site["site"] / "auth.pub"
        out = _json_out(flwr(layout, "supernode", "register", str(pub), CONNECTION, "--name", site["site"],
                             "--format", "json"))
        if not out.get("success"):
            raise CoordinatorError(f"could not register site {site['site']}: {out.get('error-message', out)}")
        pki.record_node_id(layout.root, site["site"], int(out["node-id"]))
        done.append(site["site"])
    return done


def unregister(layout: Layout, node_id: int) -> None:
    out = _json_out(flwr(layout, "supernode", "unregister", str(node_id), CONNECTION, "--format", "json"))
    if not out.get("success"):
        raise CoordinatorError(f"could not unregister node {node_id}: {out.get('error-message', out)}")


def start(root: Path, *, listen_host: str = "0.0.0.0", listen_port: int | None = None,
          superlink_port: int | None = None, ready_file: Path | None = None) -> int:
    """Run the SuperLink and the fleet proxy until SIGTERM/SIGINT or until one of them dies."""
    layout = Layout(Path(root).resolve())
    federation = pki.load_federation(layout.root)
    if running_state(layout):
        raise CoordinatorError(f"a coordinator is already running for {layout.root} (see {layout.state_file}; its "
                               "SuperLink outlives a killed fl-server start): stop it first with `fl-server stop`")
    port = listen_port or int(str(federation["address"]).rsplit(":", 1)[1])
    superlink_port = superlink_port or free_port()
    for d in (layout.state_db.parent, layout.runs, layout.logs, layout.proxy_dir):
        d.mkdir(parents=True, exist_ok=True)
    _write_flwr_config(layout, superlink_port)
    env = offline_env(layout.flwr_home)
    cmd = [sys.executable, "-m", "server.superlink",
           "--ssl-certfile", str(layout.pki / "server.pem"), "--ssl-keyfile", str(layout.pki / "server.key"),
           "--ssl-ca-certfile", str(layout.pki / "ca.pem"),
           "--enable-supernode-auth", "--database", str(layout.state_db),
           "--disable-runtime-dependency-installation",
           "--host", "127.0.0.1", "--port", str(superlink_port)]
    env["PYTHONPATH"] = str(_project_root()) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    superlink_log = layout.logs / "superlink.log"
    with open(superlink_log, "ab") as fh:
        superlink = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, cwd=layout.root,
                                     start_new_session=True)
    proxy = None
    stopping = {"flag": False}

    def _stop(signum, frame):  # noqa: ANN001
        stopping["flag"] = True

    old = {s: signal.signal(s, _stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        import ssl

        ctx = ssl.create_default_context(cafile=str(layout.pki / "ca.pem"))
        wait_http(f"https://localhost:{superlink_port}/health", superlink, 60.0, "the SuperLink", superlink_log, ctx)
        registered = register_pending(layout)
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
        if ready_file is not None:
            ready_file.write_text(json.dumps(state))
        while not stopping["flag"]:
            if superlink.poll() is not None:
                print(f"fl-server: the SuperLink exited (code {superlink.returncode}); see {superlink_log}",
                      file=sys.stderr)
                return 1
            if proxy.poll() is not None:
                print(f"fl-server: the fleet proxy exited (code {proxy.returncode}); see "
                      f"{layout.proxy_dir / 'proxy-error.log'}", file=sys.stderr)
                return 1
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


def stop(root: Path, timeout: float = 30.0) -> bool:
    """Ask a running ``fl-server start`` to stop; False when none is running."""
    layout = Layout(Path(root).resolve())
    state = running_state(layout)
    if state is None:
        return False
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


def launch(root: Path, *, config_file: Path | None = None, overrides: dict[str, Any] | None = None,
           follow: bool = False) -> dict[str, Any]:
    """Start a run of the fedxray app on the running SuperLink; returns {run_id, run_name, bundle, run_dir}."""
    from client.approval import installed_bundle
    from common.config import ConfigError, RunConfig

    layout = Layout(Path(root).resolve())
    require_running(layout)
    values: dict[str, Any] = {}
    if config_file is not None:
        try:
            values.update(tomllib.loads(Path(config_file).read_text()))
        except (OSError, tomllib.TOMLDecodeError) as err:
            raise CoordinatorError(f"cannot read run config {config_file}: {err}") from None
    values.update(overrides or {})
    values.setdefault("run-name", time.strftime("run-%Y%m%d-%H%M%S"))
    values["runs-dir"] = str(layout.runs)
    defaults = tomllib.loads((_project_root() / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    unknown = sorted(set(values) - set(defaults))
    if unknown:
        raise CoordinatorError(f"unknown run setting(s) {', '.join(unknown)}; known: {', '.join(sorted(defaults))}")
    try:
        RunConfig.from_mapping({**defaults, **values})
    except ConfigError as err:
        raise CoordinatorError(str(err)) from None
    run_dir = layout.runs / str(values["run-name"])
    if run_dir.exists() and "resume-from" not in values:
        raise CoordinatorError(f"{run_dir} exists: choose another run-name, or continue it with "
                               f"`fl-server resume {values['run-name']}`")
    cfg = layout.root / "state" / f"{values['run-name']}.run-config.toml"
    cfg.parent.mkdir(parents=True, exist_ok=True)
    cfg.write_text(to_toml(values))
    fab_hash, _ = installed_bundle()
    app = stage_app(layout.root / "state")  # only the app files: `flwr run` walks all of its folder
    args = ["run", str(app), CONNECTION, "--run-config", str(cfg)]
    if not follow:
        proc = flwr(layout, *args, "--format", "json")
        out = _json_out(proc)
        if not out.get("success"):
            raise CoordinatorError(f"the SuperLink refused the run: {out.get('error-message', out)}")
        run_id = out.get("run-id")
    else:
        proc = subprocess.run(["flwr", *args, "--stream"], env=offline_env(layout.flwr_home), cwd=layout.root)
        if proc.returncode != 0:
            raise CoordinatorError(f"`flwr run` failed (exit {proc.returncode}); see {layout.logs / 'superlink.log'}")
        run_id = None
    record = {"run_id": run_id, "run_name": values["run-name"], "bundle": fab_hash, "run_dir": str(run_dir),
              "config": str(cfg)}
    runs_index = layout.root / "state" / "runs.jsonl"
    with open(runs_index, "a") as fh:
        fh.write(json.dumps(record) + "\n")
    return record


def resume(root: Path, run_name: str, *, follow: bool = False) -> dict[str, Any]:
    """Continue ``runs/<run_name>`` from its last checkpoint with the rounds it has left."""
    layout = Layout(Path(root).resolve())
    run_dir = layout.runs / run_name
    cfg = layout.root / "state" / f"{run_name}.run-config.toml"
    if not (run_dir / "checkpoints").is_dir() or not cfg.is_file():
        known = sorted(p.name for p in layout.runs.iterdir()) if layout.runs.is_dir() else []
        raise CoordinatorError(f"no run '{run_name}' with checkpoints under {layout.runs}; runs here: "
                               f"{', '.join(known) or 'none'}")
    values = tomllib.loads(cfg.read_text())
    values["resume-from"] = str(run_dir)
    values.pop("runs-dir", None)
    return launch(root, overrides=values, follow=follow)


def status(root: Path) -> dict[str, Any]:
    """Sites (admitted, registered, online), runs and, for the newest, the round and epsilon per site."""
    layout = Layout(Path(root).resolve())
    federation = pki.load_federation(layout.root)
    state = running_state(layout)
    nodes: dict[int, dict[str, Any]] = {}
    if state is not None:
        out = _json_out(flwr(layout, "supernode", "list", CONNECTION, "--format", "json"))
        for node in out.get("nodes", []):
            nodes[int(node["node-id"])] = node
    sites = []
    for site in pki.list_sites(layout.root):
        node = nodes.get(int(site["node_id"])) if site.get("node_id") is not None else None
        sites.append({"site": site["site"], "revoked": bool(site.get("revoked")),
                      "registered": site.get("node_id") is not None,
                      "status": node["status"] if node else ("unknown" if state is None else "not registered")})
    runs = []
    if layout.runs.is_dir():
        for run_dir in sorted(layout.runs.iterdir(), key=lambda p: p.stat().st_mtime):
            metrics = run_dir / "metrics.json"
            rounds = json.loads(metrics.read_text()).get("rounds", []) if metrics.is_file() else []
            last = rounds[-1] if rounds else {}
            runs.append({"run": run_dir.name, "rounds_done": len(rounds), "last_round": last.get("round"),
                         "pooled_auc": last.get("pooled_auc"), "epsilon": last.get("epsilon", {}),
                         "finished": (run_dir / "model.onnx").is_file()})
    return {"federation": federation.get("federation"), "address": federation["address"],
            "running": state is not None, "sites": sites, "runs": runs}


def admit_site(root: Path, request: Path, out: Path | None = None) -> tuple[Path, bool]:
    """Sign a site's request (server/pki.py) and, when the coordinator runs, register its key now.

    Returns (kit folder, registered now). Otherwise the key is registered at the next start.
    """
    layout = Layout(Path(root).resolve())
    kit = pki.admit(layout.root, request, out)
    registered = bool(running_state(layout)) and bool(register_pending(layout))
    return kit, registered


def remove_site(root: Path, site: str) -> None:
    """Revoke the site's certificate, unregister its key and make the running proxy reload the CRL."""
    layout = Layout(Path(root).resolve())
    node_id = pki.revoke(layout.root, site)
    state = running_state(layout)
    if state is None:
        return
    if node_id is not None:
        unregister(layout, node_id)
    reload_proxy(Path(state["proxy_conf"]))
