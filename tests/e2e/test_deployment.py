"""A real deployment on loopback: CA, admitted sites, nginx with mutual TLS, SuperLink with node auth.

Everything is started for real, as a hospital and a coordinator would: `fl-server init`, three
`fl-client init` requests admitted with `fl-server admit`, `fl-server start` (SuperLink with TLS,
--enable-supernode-auth and a state database, behind nginx that forwards only the Fleet API to
clients presenting a certificate of the federation), three `fl-client start` (SuperNode with the
site certificate and auth key, and the approved-bundle launcher), `fl-server run` for 2 rounds.
Then what must be refused is tried, each with its one clear line: a plaintext client, a
certificate from another CA, an unregistered auth key, a Control API call through the proxy, an
unapproved bundle (refused at the site, none of its code run), a removed site (out at once). Every
process is stopped at the end; a killed `fl-client start` takes its SuperNode and launcher with it
(tests/conftest.py fails the module if anything is left running).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from client.approval import approve, installed_bundle
from client.ledger import PrivacyLedger
from client.provision import init_site
from common.onnx_export import load_onnx_model
from common.processes import child_pids, free_port, process_alive
from server.pki import init_federation
from server.sites import admit
from simulations.hospitals import make_synthetic_hospitals

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists(),
                                                  reason="nginx not installed (.ci/run installs it)")]

SITES = ("hospital-a", "hospital-b", "hospital-c")
ROOT = Path(__file__).resolve().parents[2]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "FLWR_TELEMETRY_ENABLED": "0", "OMP_WAIT_POLICY": "PASSIVE"}


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], env=_env(), capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT)


class Procs:
    """Every process the test starts, stopped (process group) at the end whatever happens."""

    def __init__(self) -> None:
        self.items: list[subprocess.Popen] = []

    def start(self, args: list[str], log: Path) -> subprocess.Popen:
        fh = open(log, "ab")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen([sys.executable, "-m", *args], env=_env(), stdout=fh, stderr=subprocess.STDOUT,
                                cwd=ROOT, start_new_session=True)
        self.items.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
        if proc.poll() is None:
            os.killpg(proc.pid, sig)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)

    def stop_all(self) -> None:
        for proc in reversed(self.items):
            self.stop(proc)


def _wait(cond, timeout: float, what: str, interval: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _status(fed: Path) -> dict:
    out = _cli("server.cli", "status", "--dir", str(fed), "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def _site_kit(tmp: Path, fed: Path, name: str, *, with_cli: bool = False) -> Path:
    """fl-client init + admission. ``with_cli``: `fl-server admit`, which registers the key with a running coordinator."""
    site_dir = tmp / "sites" / name
    request = init_site(site_dir, name)
    if with_cli:
        out = _cli("server.cli", "admit", str(request), "--dir", str(fed))
        assert out.returncode == 0, out.stdout + out.stderr
        kit = fed / "kits" / name
    else:
        kit = admit(fed, request)
    for f in ("ca.pem", "client.pem", "coordinator.json"):
        shutil.copy(kit / f, site_dir / f)
    return site_dir


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("deploy")
    port = free_port()
    fed = tmp / "coordinator"
    init_federation(fed, f"localhost:{port}", name="e2e")
    make_synthetic_hospitals(tmp / "data", 3, patients_per_site=10, partition="label-skew", seed=0)
    bundle, _ = installed_bundle()
    procs = Procs()
    sites = {}
    try:
        for name in SITES:
            site_dir = _site_kit(tmp, fed, name)
            approve(site_dir / "state", bundle)
            sites[name] = site_dir
        coordinator = procs.start(["server.cli", "start", "--dir", str(fed), "--listen-host", "127.0.0.1"],
                                  tmp / "coordinator.log")
        _wait(lambda: (fed / "coordinator.json").exists() or coordinator.poll() is not None, 90, "the coordinator")
        assert coordinator.poll() is None, (tmp / "coordinator.log").read_text()[-3000:]
        for name, site_dir in sites.items():
            procs.start(["client.cli", "start", "--kit", str(site_dir), "--data", str(tmp / "data" / name),
                         "--max-epsilon", "20"], tmp / f"{name}.log")
        yield {"tmp": tmp, "fed": fed, "port": port, "procs": procs, "coordinator": coordinator, "sites": sites,
               "bundle": bundle}
    finally:
        procs.stop_all()


@pytest.fixture(scope="module")
def finished_run(federation):
    fed = federation["fed"]
    _wait(lambda: sum(s["status"] == "online" for s in _status(fed)["sites"]) == 3, 120, "3 sites online")
    out = _cli("server.cli", "run", "--dir", str(fed), "-c", "num-server-rounds=2", "-c", "image-size=32",
               "-c", "min-sites=3", "-c", "run-name=e2e", "-c", "target-epsilon=6", "-c", "wait-timeout=120",
               "-c", "round-timeout=600")
    assert out.returncode == 0, out.stdout + out.stderr
    assert federation["bundle"] in out.stdout  # the coordinator is told which bundle sites must approve
    run_dir = fed / "runs" / "e2e"
    _wait(lambda: (run_dir / "model.onnx").exists(), 900, "model.onnx of the 2-round run", interval=2)
    return run_dir


def _ctx(site_dir: Path | None, ca: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca))
    if site_dir is not None:
        ctx.load_cert_chain(site_dir / "client.pem", site_dir / "tls.key")
    return ctx


def test_control_api_is_not_reachable_through_the_proxy(federation):
    site = federation["sites"]["hospital-a"]
    req = urllib.request.Request(f"https://localhost:{federation['port']}/v1/control/list-runs", data=b"", method="POST")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, context=_ctx(site, site / "ca.pem"), timeout=10)  # noqa: S310
    assert err.value.code == 403


def test_plaintext_client_is_refused(federation):
    req = urllib.request.Request(f"http://localhost:{federation['port']}/v1/fleet/pull-messages", data=b"", method="POST")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=10)  # noqa: S310
    assert err.value.code == 400  # nginx: plain HTTP request sent to the HTTPS port
    site = federation["sites"]["hospital-a"]
    with pytest.raises(urllib.error.HTTPError) as err:  # TLS but no client certificate
        urllib.request.urlopen(urllib.request.Request(f"https://localhost:{federation['port']}/v1/fleet/x", data=b""),
                               context=_ctx(None, site / "ca.pem"), timeout=10)  # noqa: S310
    assert err.value.code == 400


def test_certificate_from_another_ca_is_refused(federation):
    """A site of another federation that trusts our coordinator: the proxy refuses its certificate."""
    from client.join import JoinError, probe_coordinator

    tmp = federation["tmp"]
    other = tmp / "other-federation"
    init_federation(other, f"localhost:{federation['port']}", name="other")
    stranger = _site_kit(tmp / "other", other, "stranger")
    real_ca = federation["sites"]["hospital-a"] / "ca.pem"
    with pytest.raises(urllib.error.HTTPError) as err:  # at the proxy, before any Flower code
        req = urllib.request.Request(f"https://localhost:{federation['port']}/v1/fleet/pull-messages", data=b"")
        ctx = ssl.create_default_context(cafile=str(real_ca))
        ctx.load_cert_chain(stranger / "client.pem", stranger / "tls.key")
        urllib.request.urlopen(req, context=ctx, timeout=10)  # noqa: S310
    assert err.value.code == 400
    with pytest.raises(JoinError, match="rejected this site's certificate"):  # what fl-client start says
        probe_coordinator(f"localhost:{federation['port']}", real_ca, stranger / "client.pem", stranger / "tls.key")
    # A kit whose ca.pem does not match its certificate is caught at the site before dialling at all.
    shutil.copy(real_ca, stranger / "ca.pem")
    out = _cli("client.cli", "start", "--kit", str(stranger), "--data", str(tmp / "data" / "hospital-a"), timeout=60)
    assert out.returncode == 2 and "was not signed by ca.pem" in out.stderr, out.stderr


def test_unreachable_coordinator_is_one_line(federation):
    site = federation["sites"]["hospital-a"]
    out = _cli("client.cli", "start", "--kit", str(site), "--data", str(federation["tmp"] / "data" / "hospital-a"),
               "--coordinator", f"localhost:{free_port()}", "--state-dir", str(federation["tmp"] / "unreach"), timeout=60)
    assert out.returncode == 2 and "cannot reach the coordinator" in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_unregistered_auth_key_is_refused(federation):
    """A site with a valid certificate whose key the coordinator never registered: exit 305, said in words."""
    tmp = federation["tmp"]
    site = _site_kit(tmp, federation["fed"], "hospital-x")  # signed offline (server.site_table.admit): key not registered
    approve(site / "state", federation["bundle"])
    out = _cli("client.cli", "start", "--kit", str(site), "--data", str(tmp / "data" / "hospital-a"),
               "--rejoin-wait", "0", timeout=120)
    assert out.returncode == 3, out.stdout + out.stderr
    assert "refused this site's authentication key" in out.stderr


def test_two_rounds_over_mutual_tls(finished_run, federation):
    rounds = json.loads((finished_run / "metrics.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    assert set(rounds[-1]["epsilon"]) == set(SITES)
    model = load_onnx_model(finished_run / "model.onnx")
    probs = model.predict(np.random.default_rng(0).random((2, 1, 32, 32), dtype=np.float32))
    assert probs.shape == (2, 1)
    for name in SITES:
        ledger = PrivacyLedger(federation["sites"][name] / "state", site=name, max_epsilon=20.0, delta=1e-5)
        assert sorted(c.round for c in ledger.contributions() if c.kind == "train") == [1, 2]
    # Every Fleet request the SuperLink saw came through the proxy with a federation certificate.
    access = (federation["fed"] / "proxy" / "proxy-access.log").read_text()
    assert all(f"CN={name}" in access for name in SITES)


def test_status_reports_sites_and_rounds(finished_run, federation):
    status = _status(federation["fed"])
    assert status["running"] and set(SITES) <= {s["site"] for s in status["sites"]}
    assert status["unadmitted_nodes"] == [] and status["warnings"] == []
    run = next(r for r in status["runs"] if r["run"] == "e2e")
    assert run["finished"] and run["last_round"] == 2 and set(run["epsilon"]) == set(SITES)


def test_follow_prints_each_log_line_once_and_records_the_run_id(federation):
    """`fl-server run --follow` printed every Flower log line twice and "Flower run id None", and the audit log
    recorded flower_run_id null: the run is now launched by id and its log followed, each record once."""
    from common.audit import audit_path, read_entries

    fed = federation["fed"]
    _wait(lambda: sum(s["status"] == "online" for s in _status(fed)["sites"]) >= 3, 120, "3 sites online")
    out = _cli("server.cli", "run", "--follow", "--dir", str(fed), "-c", "num-server-rounds=1", "-c", "image-size=32",
               "-c", "min-sites=3", "-c", "run-name=followed", "-c", "target-epsilon=6", "-c", "wait-timeout=120",
               "-c", "round-timeout=600", timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr
    started = re.search(r"run followed started \(Flower run id (\d+)\)", out.stdout)
    assert started, out.stdout[:2000]
    assert out.stdout.index(started.group(0)) < out.stdout.index("[ROUND 1/1]")  # said before the log, not after
    for record in ("[ROUND 1/1]", "round 1/1: pooled AUC", "configure_train: Sampled 3 nodes"):
        assert sum(record in line for line in out.stdout.splitlines()) == 1, record
    launched = [e for e in read_entries(audit_path(fed)) if e["event"] == "run-launched"
                and e["details"].get("run") == "followed"]
    assert [str(e["details"]["flower_run_id"]) for e in launched] == [started.group(1)]  # as Flower's JSON gives it
    assert (fed / "runs" / "followed" / "model.onnx").is_file()  # --follow returned when the run had ended


def _ledger_rounds(site_dir: Path, site: str, run_name: str) -> list[int]:
    ledger = PrivacyLedger(site_dir / "state", site=site, max_epsilon=20.0, delta=1e-5)
    # Ledger run ids are "<run name>-<coordinator's run id>@<weights digest>".
    ours = re.compile(rf"^{re.escape(run_name)}-[0-9a-f]{{16}}@")
    return sorted(c.round for c in ledger.contributions() if ours.match(c.run_id) and c.kind == "train")


def test_site_killed_mid_round_then_rejoins(finished_run, federation):
    """hospital-c's `fl-client start` is killed (SIGKILL) while it trains round 1: its SuperNode, launcher and
    ClientApp stop with it, the run goes on (min-sites 2), and hospital-c, started again at once as its service
    manager would, trains in round 2 under the same node id, with nothing charged twice."""
    tmp, fed, procs, sites = federation["tmp"], federation["fed"], federation["procs"], federation["sites"]
    site_c = sites["hospital-c"]
    proc_c = next(p for p in procs.items if p.args[3:5] == ["start", "--kit"] and p.args[5] == str(site_c))
    out = _cli("server.cli", "run", "--dir", str(fed), "-c", "num-server-rounds=2", "-c", "image-size=32",
               "-c", "min-sites=2", "-c", "run-name=site-crash", "-c", "target-epsilon=6", "-c", "round-timeout=600")
    assert out.returncode == 0, out.stderr
    run_id = out.stdout.split("Flower run id ")[1].split(")")[0]
    launcher = site_c / "state" / "logs" / "launcher.log"
    _wait(lambda: f"run {run_id}: app bundle" in launcher.read_text(), 180, "hospital-c starting round 1", 0.2)
    time.sleep(3)  # its ClientApp is loading data and training: no reply sent yet
    site_children = child_pids(proc_c.pid)  # its SuperNode and bundle launcher (each in its own session)
    assert len(site_children) == 2
    procs.stop(proc_c, signal.SIGKILL)  # fl-client start dies; its SuperNode, launcher and ClientApp must follow
    _wait(lambda: not any(process_alive(pid) for pid in site_children), 60, "hospital-c's SuperNode and launcher to stop",
          0.5)
    procs.start(["client.cli", "start", "--kit", str(site_c), "--data", str(tmp / "data" / "hospital-c"),
                 "--max-epsilon", "20"], tmp / "hospital-c-restart.log")
    _wait(lambda: any(s["site"] == "hospital-c" and s["status"] == "online" for s in _status(fed)["sites"]), 180,
          "hospital-c online again")
    run_dir = fed / "runs" / "site-crash"
    _wait(lambda: (run_dir / "checkpoints" / "round-00001.pt").exists(), 600, "round 1")
    _wait(lambda: (run_dir / "model.onnx").exists(), 900, "the run to finish", interval=2)
    rounds = json.loads((run_dir / "metrics.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    assert {"hospital-a", "hospital-b"} <= set(rounds[0]["epsilon"])
    c_rounds = _ledger_rounds(site_c, "hospital-c", "site-crash")
    assert 2 in c_rounds and len(c_rounds) == len(set(c_rounds))  # rejoined, trained round 2, nothing twice
    assert "hospital-c" in rounds[1]["epsilon"]


def test_coordinator_killed_mid_run_then_resumed(finished_run, federation):
    """SuperLink, proxy and ServerApp are killed (SIGKILL) after round 1; a new `fl-server start` and
    `fl-server resume` finish round 2: no round lost or counted twice, no duplicate ledger entry."""
    tmp, fed, procs = federation["tmp"], federation["fed"], federation["procs"]
    _wait(lambda: sum(s["status"] == "online" for s in _status(fed)["sites"]) >= 3, 120, "3 sites online")
    out = _cli("server.cli", "run", "--dir", str(fed), "-c", "num-server-rounds=2", "-c", "image-size=32",
               "-c", "min-sites=3", "-c", "run-name=coord-crash", "-c", "target-epsilon=6", "-c", "round-timeout=600")
    assert out.returncode == 0, out.stderr
    run_dir = fed / "runs" / "coord-crash"
    _wait(lambda: (run_dir / "checkpoints" / "round-00001.pt").exists(), 600, "round 1 checkpoint")
    # The coordinator host "crashes": supervisor, SuperLink (with its ServerApp) and proxy all SIGKILLed.
    state = json.loads((fed / "coordinator.json").read_text())
    for key in ("superlink_pid", "proxy_pid"):
        os.killpg(int(state[key]), signal.SIGKILL)
    procs.stop(federation["coordinator"], signal.SIGKILL)
    from server.coordinator import Layout, running_state

    _wait(lambda: running_state(Layout(fed)) is None, 30, "the killed SuperLink to be gone", 0.2)
    assert not (run_dir / "model.onnx").exists()
    coordinator = procs.start(["server.cli", "start", "--dir", str(fed), "--listen-host", "127.0.0.1"],
                              tmp / "coordinator-restart.log")
    federation["coordinator"] = coordinator
    _wait(lambda: sum(s["status"] == "online" for s in _status(fed)["sites"]) >= 3, 180, "sites to reconnect")
    out = _cli("server.cli", "resume", "coord-crash", "--dir", str(fed))
    assert out.returncode == 0, out.stdout + out.stderr
    _wait(lambda: (run_dir / "model.onnx").exists(), 900, "the resumed run to finish", interval=2)
    rounds = json.loads((run_dir / "metrics.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    for name in SITES:
        assert _ledger_rounds(federation["sites"][name], name, "coord-crash") == [1, 2], name


def test_unapproved_bundle_is_refused_at_the_site(finished_run, federation):
    """A site that approved nothing: the run's bundle is refused before any of its code runs there."""
    tmp, fed, procs = federation["tmp"], federation["fed"], federation["procs"]
    site = _site_kit(tmp, fed, "hospital-d", with_cli=True)
    proc = procs.start(["client.cli", "start", "--kit", str(site), "--data", str(tmp / "data" / "hospital-a")],
                       tmp / "hospital-d.log")
    _wait(lambda: any(s["site"] == "hospital-d" and s["status"] == "online" for s in _status(fed)["sites"]), 90,
          "hospital-d online")
    out = _cli("server.cli", "run", "--dir", str(fed), "-c", "num-server-rounds=1", "-c", "image-size=32",
               "-c", "min-sites=4", "-c", "run-name=unapproved", "-c", "round-timeout=30", "-c", "wait-timeout=60")
    assert out.returncode == 0, out.stderr
    log = site / "state" / "logs" / "launcher.log"
    _wait(lambda: log.exists() and "is not approved at this site" in log.read_text(), 120, "the refusal line")
    assert federation["bundle"] in log.read_text()
    # None of the bundle's code ran at the site: the ClientApp would have written a ledger and replies.
    assert not (site / "state" / "privacy_ledger.json").exists() and not (site / "state" / "replies").exists()
    procs.stop(proc)


def test_removed_site_is_out_at_once(finished_run, federation):
    """`fl-server remove` on a running coordinator: the proxy refuses the certificate, then the key is unregistered."""
    from client.join import JoinError, probe_coordinator

    fed, site = federation["fed"], federation["tmp"] / "sites" / "hospital-d"
    node_id = next(s["node_id"] for s in json.loads(_cli("server.cli", "sites", "--dir", str(fed), "--json").stdout)
                   if s["site"] == "hospital-d")
    out = _cli("server.cli", "remove", "hospital-d", "--dir", str(fed))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "the fleet proxy reloaded the CRL (the certificate is refused), then its SuperNode key was unregistered" in out.stdout
    with pytest.raises(JoinError, match="rejected this site's certificate"):
        probe_coordinator(f"localhost:{federation['port']}", site / "ca.pem", site / "client.pem", site / "tls.key")
    status = _status(fed)
    assert next(s for s in status["sites"] if s["site"] == "hospital-d")["revoked"]
    assert status["unadmitted_nodes"] == []  # its key is not left registered
    from server.coordinator import Layout, list_nodes

    assert list_nodes(Layout(fed))[node_id]["status"] == "unregistered"
