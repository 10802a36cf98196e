"""fl-sim end to end: 3 simulated hospitals, 2 DP rounds, real SuperLink + Flower Simulation Engine.

Checks the interfaces of docs/interfaces.md across the whole path: model.onnx runs in onnxruntime (interface 3),
metrics hold both rounds (interface 4), and each site's privacy ledger, metrics.json, the ONNX metadata and
the model card report the same epsilon (interface 5).
"""

from __future__ import annotations

import json
import subprocess
import sys

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
        # Under DP the sites send no training loss (it is not accounted); the loss shown is validation's.
        # A handful of validation images under the sites' noise: the AUC may be "not estimable" (null), never invented.
        assert (r["pooled_auc"] is None or 0.0 <= r["pooled_auc"] <= 1.0) and r["train_loss"] is None
        assert r["eval_loss"] is None or r["eval_loss"] > 0
        assert set(r["epsilon"]) == {"hospital-a", "hospital-b", "hospital-c"}
        assert set(r["sites"]) == set(r["epsilon"])


def test_the_simulation_also_reports_the_exact_validation_auc(sim_run):
    """The coordinator sees noised histograms; fl-sim, holding every site's data, scores exactly too."""
    _, root = sim_run
    exact = json.loads((root / "exact-validation.json").read_text())
    assert exact["last"]["round"] == 2 and 0.0 <= exact["last"]["auc"] <= 1.0 and exact["images"] > 0


def test_onnx_runs_in_onnxruntime(sim_run):
    _, root = sim_run
    model = load_onnx_model(root / "run" / "model.onnx")
    x = np.random.default_rng(0).random((3, 1, 32, 32), dtype=np.float32)
    probs = model.predict(x)
    assert probs.shape == (3, 1) and np.all((probs >= 0) & (probs <= 1))
    assert model.meta["labels"] == ["opacity"] and model.meta["rounds"] == 2


def test_torchscript_twin_beside_onnx(sim_run):
    """model.pt: the same model and metadata as model.onnx (common/torchscript_export.py)."""
    from common.torchscript_export import load_torchscript_model

    _, root = sim_run
    onnx_model, ts_model = load_onnx_model(root / "run" / "model.onnx"), load_torchscript_model(root / "run" / "model.pt")
    assert ts_model.raw_meta == onnx_model.raw_meta
    x = np.random.default_rng(1).random((3, 1, 32, 32), dtype=np.float32)
    assert np.max(np.abs(ts_model.predict(x) - onnx_model.predict(x))) <= 1e-4


def test_ledgers_metrics_card_agree(sim_run):
    _, root = sim_run
    last = json.loads((root / "run" / "metrics.json").read_text())["rounds"][-1]
    card = (root / "run" / "model_card.md").read_text()
    onnx_eps = load_onnx_model(root / "run" / "model.onnx").meta["epsilon"]
    for site, eps in last["epsilon"].items():
        ledger = PrivacyLedger(root / "state" / site, site=site, max_epsilon=10.0, delta=1e-5)
        trained = [c for c in ledger.contributions() if c.kind == "train"]
        assert [c.round for c in trained] == [1, 2]  # one per round, no duplicates
        assert trained[-1].epsilon_after == pytest.approx(eps, rel=1e-9)
        assert 0 < eps <= 4.0 + 1e-6  # the target epsilon for the planned rounds
        assert f"| {site} |" in card and f"{eps:.3f}" in card
        assert float(onnx_eps[site]) == pytest.approx(eps, rel=1e-9)


def test_status_lets_anyone_recompute_epsilon_with_opacus(sim_run):
    """Contract 6: `fl-client status --json` holds every charge; Opacus alone gives back the reported epsilon."""
    from opacus.accountants import RDPAccountant

    _, root = sim_run
    last = json.loads((root / "run" / "metrics.json").read_text())["rounds"][-1]
    for site, eps in last["epsilon"].items():
        out = subprocess.run([sys.executable, "-m", "client.cli", "status", "--state-dir", str(root / "state" / site),
                              "--json"], capture_output=True, text=True, check=True)
        status = json.loads(out.stdout)
        assert status["max_epsilon"] == 10.0 and status["delta"] == 1e-5
        trained = [e for e in status["entries"] if e["kind"] == "train"]
        accountant = RDPAccountant()
        accountant.history = [(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in trained]
        assert all(e["accountant"] == "rdp" for e in status["entries"])
        assert accountant.get_epsilon(delta=status["delta"]) == pytest.approx(eps, rel=1e-6)
        assert status["spent_epsilon"] >= eps - 1e-9  # the most exposed patient: training or validation
        assert all(set(e) >= {"noise_multiplier", "sample_rate", "steps", "delta", "accountant"} for e in status["entries"])


def test_the_model_carries_a_drift_reference_for_the_clinic(sim_run):
    """Issue 12: the export stores noised reference statistics that fl-predict's drift check reads."""
    from common.reference import IMAGE_STATS, parse_reference

    _, root = sim_run
    model = load_onnx_model(root / "run" / "model.onnx")
    reference = parse_reference(model.raw_meta["fedxray.reference"], "model.onnx")
    assert set(IMAGE_STATS) <= set(reference.statistics) and "score:opacity" in reference.statistics
    assert reference.n_images > 0 and reference.input_size == (32, 32)


def test_onnx_parity_checked_on_radiographs(sim_run):
    """The export's parity check ran on real-looking radiographs (fl-sim passes a hospital folder), within 1e-4."""
    _, root = sim_run
    export = json.loads((root / "run" / "metrics.json").read_text())["export"]
    assert export["parity_images"] > 0 and export["max_abs_diff"] <= 1e-4
    assert "reference radiographs" in (root / "run" / "model_card.md").read_text()


def test_a_finished_run_leaves_its_folder_lean(sim_run):
    """The sites' caches (0.55 GB of `make demo`'s 0.9 GB run folder) go when the run has finished; what the
    docs point at stays (hospitals, ledgers, the run)."""
    _, root = sim_run
    assert list(root.glob("state/*/cache")) == []
    assert len(list(root.glob("state/*/privacy_ledger.json"))) == 3 and (root / "hospitals" / "hospital-a").is_dir()
