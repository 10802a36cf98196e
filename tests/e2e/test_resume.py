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

import pytest

from client.ledger import PrivacyLedger
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
