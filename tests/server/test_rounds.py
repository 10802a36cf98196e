"""server/rounds.py: what the coordinator keeps after every round, without Flower."""

from __future__ import annotations

import json

import numpy as np
import pytest

from common.config import RunConfig
from common.metrics import EVAL_EDGES, score_histograms
from server.checkpoint import latest_checkpoint, load_best
from server.rounds import EarlyStop, RoundKeeper, epsilon_summary
from server.strategy import RoundLog, make_strategy


def _log_round(strategy, r: int, separation: float) -> None:
    """A round as the strategy records it: two sites' train metrics and evaluation histograms."""
    rng = np.random.default_rng(r)
    y = np.r_[np.zeros(50), np.ones(50)]
    scores = np.clip(0.5 + separation * (y - 0.5) + rng.normal(0, 0.1, 100), 0, 1)
    h = score_histograms(y, scores, edges=EVAL_EDGES)
    strategy.logs[r] = RoundLog(
        train={s: {"num-examples": 80.0, "epsilon-total": 1.0 * r, "steps": 5.0} for s in ("a", "b")},
        evaluate={s: {"num-examples": 100.0, "hist-pos": h["pos"], "hist-neg": h["neg"], "auc": 0.5} for s in ("a", "b")},
    )


def _keeper(tmp_path, patience: int = 0):
    strategy = make_strategy(RunConfig())
    keeper = RoundKeeper(strategy=strategy, run_dir=tmp_path, run_name="r", config_map={"model": "scatternet"},
                         history=[], start_round=0, total_rounds=5, patience=patience)
    return strategy, keeper


def test_each_round_is_checkpointed_with_a_contract_4_record(tmp_path):
    strategy, keeper = _keeper(tmp_path)
    weights = {"w": np.ones(3, np.float32)}
    assert keeper.after_round(0, weights) is None  # before the first round: nothing to keep
    _log_round(strategy, 1, 0.6)
    rec = keeper.after_round(1, weights)
    doc = json.loads((tmp_path / "metrics.json").read_text())
    (entry,) = doc["rounds"]
    assert {"round", "pooled_auc", "train_loss", "epsilon", "sites"} <= set(entry)
    assert entry["round"] == 1 and entry["epsilon"] == {"a": 1.0, "b": 1.0} and 0.9 < entry["pooled_auc"] <= 1.0
    assert entry["train_loss"] is None  # DP sites send none
    assert latest_checkpoint(tmp_path).round == 1 and rec["pooled_auc"] == entry["pooled_auc"]


def test_the_best_round_is_kept_not_overwritten_by_a_worse_one(tmp_path):
    strategy, keeper = _keeper(tmp_path)
    _log_round(strategy, 1, 0.6)
    keeper.after_round(1, {"w": np.full(2, 1.0, np.float32)})
    _log_round(strategy, 2, 0.05)  # a worse round
    keeper.after_round(2, {"w": np.full(2, 2.0, np.float32)})
    best_round, best_weights, _ = load_best(tmp_path)
    assert best_round == 1 and best_weights["w"][0] == 1.0
    assert latest_checkpoint(tmp_path).round == 2


def test_early_stop_after_patience_rounds_without_gain(tmp_path):
    strategy, keeper = _keeper(tmp_path, patience=2)
    _log_round(strategy, 1, 0.6)
    keeper.after_round(1, {"w": np.zeros(1, np.float32)})
    _log_round(strategy, 2, 0.3)
    keeper.after_round(2, {"w": np.zeros(1, np.float32)})
    _log_round(strategy, 3, 0.3)
    with pytest.raises(EarlyStop):
        keeper.after_round(3, {"w": np.zeros(1, np.float32)})


def test_multilabel_round_has_per_finding_auc_and_threshold(tmp_path):
    """Pooled one-vs-rest AUC per finding from the sites' histograms, named by finding, with its own threshold."""
    from server.rounds import round_record

    strategy = make_strategy(RunConfig(task="multilabel", labels=("Effusion", "Nodule")))
    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(60), np.ones(40)]
    site = {"num-examples": 100.0}
    for c, separation in enumerate((0.6, 0.0)):  # Effusion separable, Nodule not
        h = score_histograms(y, np.clip(0.3 + separation * y + rng.normal(0, 0.1, 100), 0, 1), edges=EVAL_EDGES)
        site[f"hist-pos-{c}"], site[f"hist-neg-{c}"] = h["pos"], h["neg"]
    strategy.logs[1] = RoundLog(evaluate={"a": dict(site), "b": dict(site)})
    rec = round_record(strategy, 1, 1.0)
    eff, nod = rec["labels"]["Effusion"], rec["labels"]["Nodule"]
    assert eff["auc"] > 0.95 and 0.3 < nod["auc"] < 0.7
    assert rec["pooled_auc"] == pytest.approx((eff["auc"] + nod["auc"]) / 2)
    assert 0.3 < eff["threshold"] < 0.9 and eff["positives"] == 80 and eff["negatives"] == 120
    assert eff["sensitivity"] > 0.9 and eff["specificity"] > 0.9


def test_epsilon_log_lists_a_few_sites_and_summarises_many():
    few = {"hospital-b": 2.5, "hospital-a": 1.25}
    assert epsilon_summary(few) == "hospital-a 1.25, hospital-b 2.50"
    many = {f"site-{i:03d}": 1.0 + i / 100 for i in range(100)}
    line = epsilon_summary(many)
    assert line == "100 sites: min 1.00 (site-000), median 1.50, max 1.99 (site-099)"
    assert len(line) < 80
