"""fl-sim --ray-address: the same simulation on an existing Ray cluster of two nodes (loopback).

A real cluster: ``ray start --head`` and ``ray start --address`` with one CPU each, their own
temp dirs and no dashboard, then ``fl-sim --ray-address`` with three synthetic hospitals for one
round. Ray's own actor table (read from the cluster's GCS) must show Flower's ClientApp actors on
both nodes, and each node's own worker logs an actor that read a site's data. The nodes are stopped by
signalling their ``ray start --block`` processes (which end their raylets, GCS and workers), then
anything still carrying this cluster's environment marker is ended: never ``ray stop``, which
ends every Ray process on the machine, other people's simulations included.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.processes import free_port
from simulations.cli import main

# 45 s on the quiet 2-core machine (cluster start 13 s, the fl-sim run 27 s, stop 6 s); 100-120 s when
# other simulations hold the cores.
pytestmark = pytest.mark.e2e

RAY = str(Path(sys.executable).parent / "ray")
MARK = "FEDXRAY_RAY_CLUSTER_TEST"

# Reads the cluster's GCS (no dashboard needed): alive node ids and every actor ever created, dead ones included.
PROBE = """
import json, sys, ray
from ray._private import state
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False, include_dashboard=False)
nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
actors = [{"class": a["ActorClassName"], "node": a["Address"]["NodeID"], "state": a["State"]}
          for a in state.actors().values()]
print(json.dumps({"nodes": nodes, "actors": actors}))
ray.shutdown()
"""


def _probe(address: str, env: dict[str, str]) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, address], env=env, capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def _marked(token: str) -> list[int]:
    want = f"{MARK}={token}".encode()
    pids = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if want in (entry / "environ").read_bytes().split(b"\0") and int(entry.name) != os.getpid():
                if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X"):
                    pids.append(int(entry.name))
        except (OSError, IndexError):
            continue
    return pids


def _stop_cluster(nodes: list[subprocess.Popen], token: str) -> None:
    for proc in reversed(nodes):  # worker first, then head
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # `ray start --block` ends its node's processes on SIGTERM
    for proc in nodes:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    deadline = time.monotonic() + 20
    while _marked(token) and time.monotonic() < deadline:
        time.sleep(0.5)
    for sig in (signal.SIGTERM, signal.SIGKILL):  # only this cluster's processes carry the marker
        for pid in _marked(token):
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        time.sleep(2)


def _wait_port(port: int, proc: subprocess.Popen, log: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited ({proc.returncode}): {log.read_text()[-2000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise RuntimeError(f"the Ray head did not listen on {port} within {timeout:.0f} s: {log.read_text()[-2000:]}")


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory) -> Iterator[tuple[str, dict[str, str], list[Path]]]:
    """(GCS address, environment, each node's temp dir) of a two-node cluster, one CPU per node."""
    root = tmp_path_factory.mktemp("ray")
    token = secrets.token_hex(8)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update({MARK: token, "RAY_USAGE_STATS_ENABLED": "0", "OMP_WAIT_POLICY": "PASSIVE"})
    port = free_port()
    address = f"127.0.0.1:{port}"
    common = ["--block", "--num-cpus", "1", "--node-ip-address", "127.0.0.1", "--disable-usage-stats",
              "--object-store-memory", str(100 * 2**20)]
    temp_dirs = [root / "head", root / "worker"]
    commands = [
        [RAY, "start", "--head", "--port", str(port), "--include-dashboard", "false",
         "--ray-client-server-port", str(free_port()), "--temp-dir", str(temp_dirs[0])],
        [RAY, "start", "--address", address, "--temp-dir", str(temp_dirs[1])],
    ]
    nodes: list[subprocess.Popen] = []
    try:
        for i, cmd in enumerate(commands):
            log = root / f"node-{i}.log"
            with open(log, "wb") as fh:
                nodes.append(subprocess.Popen(cmd + common + ["--dashboard-agent-listen-port", str(free_port())],
                                              env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True))
            if i == 0:
                _wait_port(port, nodes[0], log)
        deadline = time.monotonic() + 90
        while len(_probe(address, env)["nodes"]) < 2:
            if time.monotonic() > deadline or any(p.poll() is not None for p in nodes):
                raise RuntimeError("the worker node did not join: " + (root / "node-1.log").read_text()[-2000:])
            time.sleep(1)
        yield address, env, temp_dirs
    finally:
        _stop_cluster(nodes, token)


def test_fl_sim_runs_its_sites_on_both_nodes_of_a_ray_cluster(ray_cluster, tmp_path, monkeypatch):
    address, env, temp_dirs = ray_cluster
    monkeypatch.setenv(MARK, env[MARK])  # fl-sim's processes are ended with the cluster if a run hangs
    rc = main(["run", "--ray-address", address, "--out", str(tmp_path), "--name", "ray", "--sites", "3",
               "--rounds", "1", "--image-size", "32", "--patients", "8", "--local-epochs", "1",
               "--partition", "iid", "--target-epsilon", "4", "--set", "tracking-uri=off"])
    root = tmp_path / "ray"
    assert rc == 0, (root / "run.log").read_text()[-3000:] if (root / "run.log").exists() else "no run log"
    last = json.loads((root / "run" / "metrics.json").read_text())["rounds"][-1]
    # 3 sites of 8 patients: the noised validation counts may leave a class without a positive total, and the
    # coordinator then says "not estimable" (None) rather than print a number; every site's reply arrived either way
    assert last["round"] == 1 and (last["pooled_auc"] is None or 0.0 <= last["pooled_auc"] <= 1.0)
    assert set(last["sites"]) == {"hospital-a", "hospital-b", "hospital-c"}
    assert set(last["epsilon"]) == {"hospital-a", "hospital-b", "hospital-c"}

    # The cluster ran the sites: Flower's ClientApp actors were placed on both nodes ...
    seen = _probe(address, env)
    assert len(seen["nodes"]) == 2
    site_actors = [a for a in seen["actors"] if a["class"] == "ClientAppActor"]
    assert {a["node"] for a in site_actors} == set(seen["nodes"]), seen
    # ... and they did site work there, not only start: each node's own worker logs hold a ClientApp actor
    # that read a site's data (common/loaders.py warns about the corrupt files every synthetic site has).
    for temp_dir in temp_dirs:
        logs = [p.read_text(errors="replace") for p in temp_dir.glob("session_*/logs/worker-*.err")]
        assert any(":actor_name:ClientAppActor" in text and "file(s) skipped" in text for text in logs), \
            f"no ClientApp actor read a site on the node of {temp_dir}"
