"""A simulated run killed after round 1 and resumed: no round lost or counted twice.

The coordinator side (fl-sim with its SuperLink and ServerApp) is stopped by SIGTERM once the
round-1 checkpoint exists, possibly in the middle of round 2; `fl-sim resume` must then finish
the remaining rounds, and every site's ledger must hold exactly one contribution per round.
A round of this tiny federation takes about a quarter of a second, so the run has many rounds
and the test watches closely: the kill must land well before the last one.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from client.ledger import PrivacyLedger
from common.processes import process_table, stop_processes, with_descendants
from simulations.cli import main

pytestmark = pytest.mark.e2e

ROUNDS = 24


def test_kill_after_round_one_then_resume(tmp_path):
    sim = tmp_path / "killed"
    cmd = [sys.executable, "-m", "simulations.cli", "run", "--out", str(tmp_path), "--name", "killed", "--sites", "3",
           "--rounds", str(ROUNDS), "--image-size", "32", "--patients", "10", "--local-epochs", "1", "--target-epsilon", "6",
           "--partition", "label-skew"]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONPATH": os.getcwd()})
    ckpt = sim / "run" / "checkpoints" / "round-00001.pt"
    try:
        deadline = time.monotonic() + 600
        while not ckpt.exists():
            assert proc.poll() is None, "fl-sim ended before round 1 was checkpointed"
            assert time.monotonic() < deadline, "no round-1 checkpoint within 10 minutes"
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    last = sim / "run" / "checkpoints" / f"round-{ROUNDS:05d}.pt"
    assert not last.exists(), "fl-sim finished every round before it was stopped: nothing to resume"

    assert main(["resume", str(sim)]) == 0
    rounds = json.loads((sim / "run" / "metrics.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == list(range(1, ROUNDS + 1))
    assert (sim / "run" / "model.onnx").is_file()
    for site in rounds[-1]["epsilon"]:
        ledger = PrivacyLedger(sim / "state" / site, site=site, max_epsilon=10.0, delta=1e-5)
        entries = [c for c in ledger.contributions() if c.kind == "train"]
        assert sorted(c.round for c in entries) == list(range(1, ROUNDS + 1)), f"{site}: {[c.round for c in entries]}"
        assert entries[-1].epsilon_after == pytest.approx(rounds[-1]["epsilon"][site], rel=1e-9)
        evaluations = sorted(c.round for c in ledger.contributions() if c.kind == "evaluate")
        assert evaluations == sorted(set(evaluations)), f"{site}: an evaluation charged twice: {evaluations}"


def _running(tree: dict[int, int]) -> list[str]:
    """The processes of ``tree`` (pid -> start time) that still run: 'pid command line'."""
    table, out = process_table(), []
    for pid, started in tree.items():
        if pid in table and table[pid][2] == started and table[pid][1] not in ("Z", "X"):
            try:
                out.append(f"{pid} " + (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode())
            except OSError:
                continue
    return out


def _train_rounds(sim: Path, site: str) -> list[int]:
    ledger = PrivacyLedger(sim / "state" / site, site=site, max_epsilon=10.0, delta=1e-5)
    return sorted(c.round for c in ledger.contributions() if c.kind == "train")


def test_ctrl_c_stops_every_process_and_resume_never_trains_a_round_twice(tmp_path, capsys):
    """Ctrl-C on fl-sim: flwr-simulation, the private Ray cluster and the SuperLink all stop within seconds, and
    fl-sim says how to resume. `resume` is refused while the run or an orphan of it is alive (an fl-sim killed
    with SIGKILL leaves its run training: resuming beside it trained rounds twice) and on a finished run."""
    rounds = 30  # a tiny round takes a quarter of a second or more: the orphans cannot finish in the second they get
    sim = tmp_path / "stopped"
    cmd = [sys.executable, "-m", "simulations.cli", "run", "--out", str(tmp_path), "--name", "stopped", "--sites", "3",
           "--rounds", str(rounds), "--image-size", "32", "--patients", "10", "--local-epochs", "1",
           "--target-epsilon", "6", "--partition", "label-skew"]
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    # As a terminal starts it: SIGINT at its default. fl-sim keeps a SIGINT it inherited as ignored (a shell's
    # background job), and a suite started as one (`nohup ... &` in a script) runs with SIGINT ignored.
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, preexec_fn=_interactive_signals)
    try:
        _wait_for(sim / "run" / "checkpoints" / "round-00001.pt", proc)
        assert main(["resume", str(sim)]) == 2  # the run is alive: refused, nothing trained
        assert "in use by a running fl-sim" in capsys.readouterr().err
        tree = with_descendants({proc.pid})  # fl-sim, the SuperLink, SuperExec, flwr-simulation, Ray and its actors
        names = " ".join(_running(tree))
        assert "raylet" in names and "gcs_server" in names and "flwr-simulation" in names, names[:2000]
        signalled = time.monotonic()
        os.kill(proc.pid, signal.SIGINT)  # what Ctrl-C in its terminal sends
        output, _ = proc.communicate(timeout=15)
        time.sleep(max(0.0, 15 - (time.monotonic() - signalled)))
        assert _running(tree) == [], "still running 15 s after Ctrl-C"
    finally:
        stop_processes(with_descendants({proc.pid}))  # when the test failed before fl-sim stopped them
    assert proc.returncode == 130 and "Traceback" not in output, output
    assert f"resume with: fl-sim resume {sim}" in output
    stopped_at = len(json.loads((sim / "run" / "metrics.json").read_text())["rounds"])
    assert stopped_at < rounds

    # A resume killed with SIGKILL leaves its run training (fl-sim cannot clean up): no second resume beside it.
    killed = subprocess.Popen([sys.executable, "-m", "simulations.cli", "resume", str(sim)], start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        _wait_for(sim / "run" / "checkpoints" / f"round-{stopped_at + 2:05d}.pt", killed)
        os.kill(killed.pid, signal.SIGKILL)
        killed.wait(timeout=10)
        assert main(["resume", str(sim)]) == 2
        err = capsys.readouterr().err
        assert "still run" in err and "fl-sim stop" in err and len(err.strip().splitlines()) == 1, err
        assert main(["stop", str(sim)]) == 0
        assert "stopped" in capsys.readouterr().out
    finally:
        if killed.poll() is None:
            killed.kill()
        main(["stop", str(sim)])  # what the SIGKILL left running, when the test failed before `stop`

    assert main(["resume", str(sim)]) == 0
    history = json.loads((sim / "run" / "metrics.json").read_text())["rounds"]
    assert [r["round"] for r in history] == list(range(1, rounds + 1))
    for site in history[-1]["epsilon"]:
        assert _train_rounds(sim, site) == list(range(1, rounds + 1)), site  # each round trained (and charged) once
        assert history[-1]["epsilon"][site] <= 6.0 + 1e-9  # the target held: no round spent twice
    capsys.readouterr()
    assert main(["resume", str(sim)]) == 2  # finished: refused in one line, nothing registered again
    err = capsys.readouterr().err
    assert "has finished" in err and len(err.strip().splitlines()) == 1, err


def _interactive_signals() -> None:
    """In the child before exec: SIGINT and SIGTERM at their defaults, as in a command typed at a terminal."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 600) -> None:
    """Until ``path`` exists; ``proc`` must live meanwhile."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the process ended before {path.name} was written"
        assert time.monotonic() < deadline, f"no {path.name} within {timeout:.0f} s"
        time.sleep(0.02)
