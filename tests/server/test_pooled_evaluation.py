"""The coordinator's reading of noised evaluation rounds, and what the exported model and its card say about it.

Five sites shaped like the default Kermany run (sizes and prevalence of its validation splits; a
confident DP head, logits far apart) send their histograms as client/round.py does: routine rounds
at noise 20 per count, the final one at 4. Issues 20 and 24: each test here fails on the code before.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from common.config import RunConfig
from common.metrics import BINARY_EDGES, EVAL_EDGES, merge_bins, noised_histograms, roc_auc, score_histograms
from common.models import build_model
from common.onnx_export import load_onnx_model
from server.checkpoint import Checkpoint, save_checkpoint
from server.export import finish
from server.pooled_evaluation import site_estimates
from server.report import add_simulation_figures
from server.rounds import auc_reading, round_record
from server.strategy import RoundLog, make_strategy

SITES = {"hospital-a": (16, 25), "hospital-b": (18, 1), "hospital-c": (344, 121), "hospital-d": (215, 23),
         "hospital-e": (81, 50)}  # (positives, negatives) of each validation split


def _scores(seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = {}
    for name, (n_pos, n_neg) in SITES.items():
        y = np.r_[np.ones(n_pos), np.zeros(n_neg)].astype(bool)
        logit = np.where(y, rng.normal(15.0, 9.0, y.size), rng.normal(-10.0, 8.0, y.size))
        out[name] = (y, 1.0 / (1.0 + np.exp(-logit)))
    return out


def _log(strategy, r: int, scores, noise: float, final: bool, rng: np.random.Generator) -> None:
    """One round as aggregate_evaluate records it: each site's reply (noised, in the released bins) and its estimates."""
    evaluate = {}
    for name, (y, p) in scores.items():
        exact = score_histograms(y, p, edges=EVAL_EDGES)
        hist = noised_histograms({k: merge_bins(exact[k], EVAL_EDGES, BINARY_EDGES) for k in ("pos", "neg")}, noise, rng)
        values = {"hist-pos": hist["pos"], "hist-neg": hist["neg"], "eval-noise": noise, "eval-final": float(final),
                  "num-examples": float(round(max(0.0, sum(hist["pos"]) + sum(hist["neg"]))))}
        values.update(site_estimates(values))
        evaluate[name] = values
    strategy.logs[r] = RoundLog(train={s: {"num-examples": 500.0, "epsilon-total": 1.5 * r} for s in SITES},
                                evaluate=evaluate)


def _exact_auc(scores) -> float:
    return roc_auc(np.concatenate([y for y, _ in scores.values()]), np.concatenate([p for _, p in scores.values()]))


def test_the_per_round_reading_carries_an_interval_that_holds_the_exact_auc():
    """A near-perfect model read from routine (noise 20) rounds: no bare, clamped 1.000, an interval instead."""
    scores = _scores()
    exact = _exact_auc(scores)
    strategy = make_strategy(RunConfig())
    rng = np.random.default_rng(1)
    inside = estimable = 0
    for r in range(1, 21):
        _log(strategy, r, scores, 20.0, False, rng)
        rec = round_record(strategy, r, 1.0)
        assert rec["eval_final"] is False
        if rec["pooled_auc"] != rec["pooled_auc"]:  # the noise left a class without a positive count: said so
            assert "not estimable" in auc_reading(rec)
            continue
        low, high = rec["pooled_auc_ci"]
        estimable += 1
        inside += low <= exact <= high
        assert "95% CI" in auc_reading(rec) and low < high and low < 0.99
    assert estimable >= 15 and inside >= estimable - 1  # 95% intervals


def test_a_sites_counts_are_estimates_never_more_positives_than_images():
    """Noise that drives a small site's negative counts below zero: the old record showed 75 positives of 35 images."""
    values = {"hist-pos": [0.0, -3.0, 2.0, 5.0, 9.0, 14.0, 20.0, 30.0], "hist-neg": [4.0, -9.0, -12.0, -6.0, 3.0, -8.0, -5.0, -7.0],
              "eval-noise": 20.0}
    values.update(site_estimates(values))
    strategy = make_strategy(RunConfig())
    strategy.logs[1] = RoundLog(evaluate={"tiny": {**values, "num-examples": 37.0}})
    site = round_record(strategy, 1, 1.0)["sites"]["tiny"]
    assert 0 <= site["val_positive"] <= site["val_examples"] and site["val_counts_estimate"] is True
    assert site["val_positive_ci95"] == pytest.approx(1.96 * 20.0 * np.sqrt(8), rel=1e-3)  # 8 noised counts summed
    assert site["val_examples_ci95"] == pytest.approx(1.96 * 20.0 * np.sqrt(16), rel=1e-3)


@pytest.fixture(scope="module")
def exported_run(tmp_path_factory) -> tuple[Path, dict]:
    """Two rounds (routine, then final), exported with the server's finish() from a phantom-trained simulation."""
    run_dir = tmp_path_factory.mktemp("run")
    run = RunConfig.from_mapping({"num-server-rounds": 2, "labels": "PNEUMONIA"})
    scores = _scores()
    strategy = make_strategy(run)
    rng = np.random.default_rng(7)
    _log(strategy, 1, scores, 20.0, False, rng)
    _log(strategy, 2, scores, 4.0, True, rng)
    history = [round_record(strategy, r, 1.0) for r in (1, 2)]
    torch.manual_seed(0)
    model = build_model(run.model, dp=True, **run.model_kwargs())
    weights = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    save_checkpoint(run_dir, Checkpoint(2, weights, {}, history, run.to_mapping()))
    finish(run_dir, "r", run, provenance={"version": "test", "bundle_sha256": "", "data_source": "synthetic"})
    return run_dir, scores


def test_the_card_states_estimates_with_intervals_that_hold_the_noise(exported_run):
    run_dir, scores = exported_run
    card = (run_dir / "model_card.md").read_text()
    assert "200 bins" not in card and "exact to within a bin" not in card  # the sites send 8 noised bins
    assert "8 bins per class" in card and "std 4" in card
    doc = json.loads((run_dir / "metrics.json").read_text())
    final = doc["rounds"][-1]
    assert {"round", "pooled_auc", "train_loss", "epsilon", "sites"} <= set(final)  # interface-4 keys kept
    low, high = final["pooled_auc_ci"]
    assert low <= _exact_auc(scores) <= high and f"{final['pooled_auc']:.3f} (95% CI {low:.3f}-{high:.3f})" in card
    assert final["eval_final"] is True and final["validation_counts"]["estimate"] is True
    for site in final["sites"].values():
        assert site["val_positive"] <= site["val_examples"]
    assert "validation images (estimate)" in card and "about " in card
    assert "operating point: `youden`, set by the federation on round 2's pooled validation histograms (final evaluation)" in card
    s_low, s_high = final["sensitivity_ci"]
    assert s_low <= final["sensitivity"] <= s_high and "sensitivity" in doc["operating_point"]


def test_the_warnings_and_the_operating_point_travel_in_the_model(exported_run):
    run_dir, _ = exported_run
    meta = load_onnx_model(run_dir / "model.onnx").meta
    warnings = json.loads(meta["warnings"])
    assert any("not for use on patients" in w for w in warnings)
    point = json.loads(meta["operating_point"])
    assert point["set_by"] == "federation" and point["rule"] == "youden" and point["final_evaluation"] is True
    assert point["threshold"] == pytest.approx(meta["threshold"])  # the threshold the model decides with
    doc = json.loads((run_dir / "metrics.json").read_text())
    assert doc["warnings"] == warnings and doc["threshold"] == pytest.approx(meta["threshold"])
    assert (run_dir / "rounds.png").is_file() and (run_dir / "roc.png").is_file()


def test_a_simulation_adds_its_exact_figures_labelled_as_such(exported_run):
    run_dir, _ = exported_run
    figures = {"exact_validation": {"round": 2, "auc": 0.989, "images": 894},
               "holdout": {"images": 727, "auc": 0.993, "auc_ci": [0.989, 0.996], "threshold": 0.31,
                           "sensitivity": 0.958, "specificity": 0.945}}
    add_simulation_figures(run_dir, figures)
    add_simulation_figures(run_dir, figures)  # a second call replaces the section
    card = (run_dir / "model_card.md").read_text()
    assert card.count("## Simulation only: exact figures") == 1
    assert "exact pooled validation AUC of the exported round (2): 0.989" in card
    assert "held-out patients (727 images" in card and "AUC 0.993 (95% CI 0.989-0.996)" in card
    assert card.index("## Simulation only") < card.index("## Model")
    doc = json.loads((run_dir / "metrics.json").read_text())
    assert doc["simulation"]["holdout"]["auc"] == 0.993 and len(doc["rounds"]) == 2


def test_each_findings_auc_interval_holds_the_noise_too():
    """Multilabel: the card's per-finding interval was Hanley-McNeil from the noised counts, blind to the noise."""
    strategy = make_strategy(RunConfig(task="multilabel", labels=("Effusion", "Nodule")))
    rng = np.random.default_rng(3)
    ys, ps, sites = [], [], {}
    for name in ("a", "b", "c"):
        y = rng.random(300) < 0.3
        p = 1 / (1 + np.exp(-(rng.normal(-2, 1.5, y.size) + 3 * y)))
        site = {"num-examples": 300.0, "eval-noise": 4.0}
        for c in (0, 1):
            h = noised_histograms(score_histograms(y, p, edges=EVAL_EDGES), 4.0, rng)
            site[f"hist-pos-{c}"], site[f"hist-neg-{c}"] = h["pos"], h["neg"]
        sites[name] = site
        ys.append(y)
        ps.append(p)
    strategy.logs[1] = RoundLog(evaluate=sites)
    rec = round_record(strategy, 1, 1.0)
    effusion = rec["labels"]["Effusion"]
    low, high = effusion["auc_ci"]
    assert low <= effusion["auc"] <= high and low <= roc_auc(np.concatenate(ys), np.concatenate(ps)) <= high
    assert high - low > 0.03  # noise in 16 bins per site: wider than Hanley-McNeil's sampling alone
