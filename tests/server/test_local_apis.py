"""The loopback APIs of the coordinator host and of a hospital host, tried as another local user would.

Issue 10, row 9: any local user of the coordinator host reached the SuperLink's Control API on
127.0.0.1 (list runs, register and activate a node), ``superlink.db`` was 0644, and a hospital's
SuperNode Runtime API handed tasks to anyone. Here the real processes run on loopback, started the
way ``fl-server start`` (server/superlink.py) and ``fl-client start`` (client/supernode.py) start
them, and each attack is tried again. Also the start path's registration hygiene: keys of removed
sites are unregistered, a key swapped on disk is not registered, and a node registered behind
fedxray's back is flagged by ``fl-server status``.
"""

from __future__ import annotations

import json
import os
import ssl
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from client.provision import init_site
from common.processes import free_port, offline_env, process_alive, stop_process, wait_http, write_local_secret
from server import pki
from server import sites as site_table
from server.cli import main as server_main
from server.control_api import (
    CONNECTION,
    flwr,
    list_nodes,
    prepare_local_auth,
    register_pending,
    superlink_command,
    unregister,
    unregister_revoked,
)
from server.coordinator import status
from server.layout import CoordinatorError, Layout

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
NOBODY = 65534


def _post(url: str, ctx: ssl.SSLContext | None, token: bytes | None = None) -> int:
    """HTTP status of an empty protobuf POST (what any local user can send with curl)."""
    headers = {"content-type": "application/protobuf"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token.decode()}"
    req = urllib.request.Request(url, data=b"", method="POST", headers=headers)
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=10) as resp:  # noqa: S310 - our own loopback URL
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code


def _env() -> dict[str, str]:
    env = offline_env()
    env["PYTHONPATH"] = str(ROOT)
    return env


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory):
    """A SuperLink as `fl-server start` runs it (no proxy: the attacks here come from the same host)."""
    tmp = tmp_path_factory.mktemp("local-apis")
    layout = Layout(pki.init_federation(tmp / "coord", "localhost:9443"))
    port = free_port()
    prepare_local_auth(layout, port)
    env = {**_env(), "FLWR_HOME": str(layout.flwr_home)}
    log = layout.logs / "superlink.log"
    with open(log, "ab") as fh:
        proc = subprocess.Popen(superlink_command(layout, port), env=env, stdout=fh, stderr=subprocess.STDOUT,
                                cwd=layout.root, start_new_session=True, umask=0o077)
    try:
        ctx = ssl.create_default_context(cafile=str(layout.pki / "ca.pem"))
        wait_http(f"https://localhost:{port}/health", proc, 60.0, "the SuperLink", log, ctx)
        # What `fl-server start` writes once up: status() and the CLI then see a running coordinator.
        layout.state_file.write_text(json.dumps({"superlink_pid": proc.pid, "superlink": f"127.0.0.1:{port}"}))
        yield {"layout": layout, "port": port, "ctx": ctx, "tmp": tmp}
    finally:
        stop_process(proc)
        layout.state_file.unlink(missing_ok=True)


def _admit(coordinator, name: str) -> Path:
    request = init_site(coordinator["tmp"] / "sites" / name, name)
    site_table.admit(coordinator["layout"].root, request)
    return request.parent


class TestCoordinatorHost:
    def test_control_api_needs_the_token(self, coordinator) -> None:
        layout, url = coordinator["layout"], f"https://localhost:{coordinator['port']}/v1/control/list-runs"
        assert _post(url, coordinator["ctx"]) == 401  # what any local user got as 200 before
        assert _post(url, coordinator["ctx"], token=b"0" * 64) == 401
        assert _post(url, coordinator["ctx"], token=layout.control_token.read_bytes()) == 200
        assert list_nodes(layout) == {}  # fedxray's own `flwr` CLI: the token from its credential store
        stranger = coordinator["tmp"] / "stranger-home"  # another user's flwr CLI: same config, no token
        stranger.mkdir()
        (stranger / "config.toml").write_bytes((layout.flwr_home / "config.toml").read_bytes())
        out = subprocess.run(["flwr", "supernode", "list", CONNECTION, "--format", "json"], capture_output=True,
                             text=True, env=offline_env(stranger), timeout=120)
        assert "Authentication failed" in out.stdout + out.stderr

    def test_runtime_api_hands_tasks_to_the_superexec_only(self, coordinator) -> None:
        url = f"https://localhost:{coordinator['port']}/v1/runtime/acquire-task"
        assert _post(url, coordinator["ctx"]) == 401
        log = (coordinator["layout"].logs / "superlink.log").read_text()
        assert "AcquireTask" in log and log.count("SuperExec authentication failed") == 1  # ours, not its SuperExec's

    def test_state_is_private(self, coordinator) -> None:
        layout = coordinator["layout"]
        for folder in (layout.state_db.parent, layout.logs, layout.flwr_home, layout.runs):
            assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder
        for path in (layout.state_db, layout.control_token, layout.superexec_secret, layout.flwr_home / "credentials.yaml"):
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path

    @pytest.mark.skipif(os.geteuid() != 0 or not Path("/usr/bin/python3").exists(),
                        reason="needs root (to act as user nobody) and a system python3 that user can run")
    def test_another_user_gets_nothing(self, coordinator) -> None:
        layout = coordinator["layout"]
        probe = ("import sys, urllib.request, ssl\n"
                 "for p in sys.argv[2:]:\n"
                 "    try: open(p, 'rb').read(); print('READ', p)\n"
                 "    except PermissionError: print('DENIED', p)\n"
                 "req = urllib.request.Request(sys.argv[1], data=b'', method='POST',"
                 " headers={'content-type': 'application/protobuf'})\n"
                 "try: urllib.request.urlopen(req, context=ssl._create_unverified_context(), timeout=10); print('HTTP 200')\n"
                 "except urllib.error.HTTPError as e: print('HTTP', e.code)\n")
        targets = [layout.state_db, layout.control_token, layout.flwr_home / "credentials.yaml"]
        out = subprocess.run(["/usr/bin/python3", "-c", probe, f"https://127.0.0.1:{coordinator['port']}/v1/control/list-runs",
                              *map(str, targets)], capture_output=True, text=True, user=NOBODY, timeout=60)
        assert out.stdout.split("\n")[:3] == [f"DENIED {t}" for t in targets], out.stdout + out.stderr
        assert "HTTP 401" in out.stdout

    def test_status_flags_a_node_fedxray_did_not_admit(self, coordinator, capsys: pytest.CaptureFixture[str]) -> None:
        layout = coordinator["layout"]
        key = ec.generate_private_key(ec.SECP384R1()).public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                                                serialization.PublicFormat.OpenSSH)
        (coordinator["tmp"] / "stray.pub").write_bytes(key + b"\n")
        out = flwr(layout, "supernode", "register", str(coordinator["tmp"] / "stray.pub"), CONNECTION, "--format", "json")
        node_id = int(json.loads(out.stdout[out.stdout.find("{"):])["node-id"])
        try:
            doc = status(layout.root)
            assert [n["node_id"] for n in doc["unadmitted_nodes"]] == [node_id]
            assert any(f"node {node_id} (registered)" in w and "unregister" in w for w in doc["warnings"])
            assert server_main(["status", "--dir", str(layout.root)]) == 0
            text = capsys.readouterr().out
            assert f"node {node_id}" in text and "NOT ADMITTED" in text and text.startswith("warning: ")
        finally:
            unregister(layout, node_id)
        assert status(layout.root)["unadmitted_nodes"] == []

    def test_start_path_unregisters_removed_sites_and_checks_bindings(self, coordinator) -> None:
        layout = coordinator["layout"]
        _admit(coordinator, "alpha")
        assert register_pending(layout) == ["alpha"]
        alpha = next(r for r in site_table.list_sites(layout.root) if r["site"] == "alpha")
        assert list_nodes(layout)[alpha["node_id"]]["status"] == "registered"
        site_table.revoke(layout.root, "alpha")  # removed while the coordinator was stopped: the key stayed registered
        assert status(layout.root)["unadmitted_nodes"][0]["removed_site"] == "alpha"
        assert unregister_revoked(layout) == [f"alpha (node {alpha['node_id']})"]
        assert list_nodes(layout)[alpha["node_id"]]["status"] == "unregistered"
        assert unregister_revoked(layout) == []

        _admit(coordinator, "beta")  # its auth.pub swapped on disk before the coordinator registers it
        other = ec.generate_private_key(ec.SECP384R1()).public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                                                  serialization.PublicFormat.OpenSSH)
        (layout.root / "sites" / "beta" / "auth.pub").write_bytes(other + b"\n")
        refused: list[str] = []
        assert register_pending(layout, refused=refused) == []
        assert len(refused) == 1 and "auth.pub is not the SuperNode key admitted for beta" in refused[0]
        with pytest.raises(CoordinatorError, match="beta"):
            register_pending(layout)
        assert status(layout.root)["unadmitted_nodes"] == []


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A site's keys and kit (nothing running): enough to start its SuperNode."""
    tmp = tmp_path_factory.mktemp("site")
    fed = pki.init_federation(tmp / "coord", "localhost:9443")
    request = init_site(tmp / "site", "st-marys")
    kit = site_table.admit(fed, request)
    return {"dir": request.parent, "kit": kit, "tmp": tmp}


def _supernode(site, *, secret: Path | None, parent_pid: int) -> tuple[subprocess.Popen, int]:
    """The SuperNode as fl-client start runs it; its coordinator is a dead port, so it only retries."""
    port = free_port()
    cmd = [sys.executable, "-m", "client.supernode", "--client-cert", str(site["kit"] / "client.pem"),
           "--client-key", str(site["dir"] / "tls.key"), "--parent-pid", str(parent_pid), "--",
           "--superlink", f"127.0.0.1:{free_port()}", "--root-certificates", str(site["kit"] / "ca.pem"),
           "--auth-supernode-private-key", str(site["dir"] / "auth.key"), "--isolation", "process",
           "--host", "127.0.0.1", "--port", str(port)]
    if secret is not None:
        cmd += ["--superexec-auth-secret-file", str(secret)]
    log = site["tmp"] / f"supernode-{port}.log"
    with open(log, "ab") as fh:
        proc = subprocess.Popen(cmd, env=_env(), stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    wait_http(f"http://127.0.0.1:{port}/health", proc, 60.0, "the SuperNode", log)
    return proc, port


def _acquire_with_secret(port: int, secret: bytes) -> None:
    """AcquireTask signed the way the bundle launcher signs it (Flower's SuperExec HMAC)."""
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
    from flwr.supercore.interceptors.http import SuperExecAuthHttpInterceptor
    from flwr.supercore.runtime import RuntimeHttpClient

    client = RuntimeHttpClient.from_server_address(
        server_address=f"127.0.0.1:{port}", insecure=True, root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec"),
                      SuperExecAuthHttpInterceptor(master_secret=secret,
                                                   protected_methods={"/flwr.proto.Runtime/AcquireTask"})])
    try:
        assert not client.AcquireTask(AcquireTaskRequest()).HasField("task")  # authenticated; nothing queued
    finally:
        client.close()


class TestHospitalHost:
    def test_runtime_api_hands_tasks_to_the_launcher_only(self, site) -> None:
        supervisor = subprocess.Popen(["sleep", "600"])  # stands in for fl-client start
        secret = write_local_secret(site["tmp"] / "runtime-api.secret")
        guarded, guarded_port = _supernode(site, secret=secret, parent_pid=supervisor.pid)
        plain, plain_port = _supernode(site, secret=None, parent_pid=supervisor.pid)
        try:
            # Flower's default, measured: any local user takes the site's tasks (and so its messages).
            assert _post(f"http://127.0.0.1:{plain_port}/v1/runtime/acquire-task", None) == 200
            # With the secret fl-client start gives the SuperNode and its launcher: refused, unless signed.
            assert _post(f"http://127.0.0.1:{guarded_port}/v1/runtime/acquire-task", None) == 401
            _acquire_with_secret(guarded_port, secret.read_bytes())
            assert stat.S_IMODE(secret.stat().st_mode) == 0o600
        finally:
            supervisor.kill()
            supervisor.wait()
        # Its supervisor gone (killed and reaped): both SuperNodes stop by themselves.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (guarded.poll() is None or plain.poll() is None):
            time.sleep(0.2)
        assert guarded.poll() is not None and plain.poll() is not None
        assert not process_alive(guarded.pid) and not process_alive(plain.pid)

    def test_launcher_stops_with_its_supernode(self, site) -> None:
        supervisor = subprocess.Popen(["sleep", "600"])
        secret = write_local_secret(site["tmp"] / "runtime-api-2.secret")
        supernode, port = _supernode(site, secret=secret, parent_pid=supervisor.pid)
        state = site["tmp"] / "state"
        with open(site["tmp"] / "launcher.log", "ab") as fh:
            launcher = subprocess.Popen([sys.executable, "-m", "client.approval", "guard", "--runtime-api-address",
                                         f"127.0.0.1:{port}", "--state-dir", str(state), "--parent-pid", str(supernode.pid),
                                         "--superexec-auth-secret-file", str(secret)], env=_env(), stdout=fh,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        try:
            time.sleep(3)  # it polls the Runtime API with the secret: no authentication error
            assert launcher.poll() is None
            assert "authentication failed" not in (site["tmp"] / "launcher.log").read_text().lower()
        finally:
            supervisor.kill()
            supervisor.wait()
        launcher.wait(timeout=40)
        supernode.wait(timeout=10)
