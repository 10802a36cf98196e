"""fl-sim end to end: 3 simulated hospitals, 2 DP rounds, real SuperLink + Flower Simulation Engine.

Checks the contracts across the whole path: model.onnx runs in onnxruntime (contract 3), metrics
hold both rounds (contract 4), and each site's privacy ledger, metrics.json, the ONNX metadata and
the model card report the same epsilon (contract 5).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from client.ledger import PrivacyLedger
from common.onnx_export import load_onnx_model
from simulations.cli import main

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def sim_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim")
    rc = main(["run", "--out", str(out), "--name", "e2e", "--sites", "3", "--rounds", "2", "--image-size", "32",
               "--patients", "10", "--local-epochs", "1", "--target-epsilon", "4", "--max-epsilon", "10",
               "--partition", "label-skew"])
    return rc, out / "e2e"


def test_run_succeeds(sim_run):
    rc, root = sim_run
    assert rc == 0, (root / "run.log").read_text()[-3000:] if (root / "run.log").exists() else "no run log"


def test_metrics_have_two_rounds(sim_run):
    _, root = sim_run
    doc = json.loads((root / "run" / "metrics.json").read_text())
    rounds = doc["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    for r in rounds:
        assert 0.0 <= r["pooled_auc"] <= 1.0 and r["train_loss"] > 0
        assert set(r["epsilon"]) == {"hospital-a", "hospital-b", "hospital-c"}
        assert set(r["sites"]) == set(r["epsilon"])


def test_onnx_runs_in_onnxruntime(sim_run):
    _, root = sim_run
    model = load_onnx_model(root / "run" / "model.onnx")
    x = np.random.default_rng(0).random((3, 1, 32, 32), dtype=np.float32)
    probs = model.predict(x)
    assert probs.shape == (3, 1) and np.all((probs >= 0) & (probs <= 1))
    assert model.meta["labels"] == ["opacity"] and model.meta["rounds"] in (2, "2")


def test_ledgers_metrics_card_agree(sim_run):
    _, root = sim_run
    last = json.loads((root / "run" / "metrics.json").read_text())["rounds"][-1]
    card = (root / "run" / "model_card.md").read_text()
    onnx_eps = load_onnx_model(root / "run" / "model.onnx").meta["epsilon"]
    for site, eps in last["epsilon"].items():
        ledger = PrivacyLedger(root / "state" / site, site=site, max_epsilon=10.0, delta=1e-5)
        contributions = ledger.contributions()
        assert len(contributions) == 2  # one per round, no duplicates
        spent = ledger.spent(contributions[0].dataset_fingerprint)
        assert spent == pytest.approx(eps, rel=1e-9)
        assert 0 < eps <= 4.0 + 1e-6  # the target epsilon for the planned rounds
        assert f"| {site} |" in card and f"{eps:.3f}" in card
        assert float(onnx_eps[site]) == pytest.approx(eps, rel=1e-9)


def test_onnx_parity_checked_on_radiographs(sim_run):
    """The export's parity check ran on real-looking radiographs (fl-sim passes a hospital folder), within 1e-4."""
    _, root = sim_run
    export = json.loads((root / "run" / "metrics.json").read_text())["export"]
    assert export["parity_images"] > 0 and export["max_abs_diff"] <= 1e-4
    assert "reference radiographs" in (root / "run" / "model_card.md").read_text()
