"""After every round: the round record (interface 4, docs/interfaces.md), the checkpoint, the best round, metrics.json, early stop.

:class:`RoundKeeper` is what the ServerApp hands Flower as ``evaluate_fn``; it is plain Python,
so what the coordinator keeps after each round is unit-tested without Flower.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from common.metrics import weighted_mean
from common.pooled_metrics import THRESHOLD_RULES
from server.checkpoint import Checkpoint, load_best, save_best, save_checkpoint
from server.ema import exported_weights
from server.pooled_evaluation import round_figures, site_counts
from server.report import write_metrics
from server.strategy import strategy_state

log = logging.getLogger("flwr.fedxray")


class EarlyStop(Exception):  # noqa: N818 - control flow, not an error
    """Raised after a round to end the rounds early (Flower 1.41 has no should_stop)."""


def round_record(strategy: Any, r: int, seconds: float) -> dict[str, Any]:
    """The interface-4 entry of round ``r``: pooled AUC, train loss, epsilon per site, per-site metrics."""
    entry = strategy.logs.get(r)
    pooled = strategy.pooled(r)
    pooled = dict(pooled) if pooled is not None else {}
    sites: dict[str, dict[str, Any]] = {}
    train_losses, train_n = [], []
    epsilon: dict[str, float] = {}
    if entry is not None:
        for site, m in entry.train.items():
            sites.setdefault(site, {}).update(
                num_examples=int(m.get("num-examples", 0)), train_loss=m.get("train-loss"),
                epsilon_round=m.get("epsilon-round"), epsilon_total=m.get("epsilon-total"),
                noise_multiplier=m.get("noise-multiplier"), sample_rate=m.get("sample-rate"), steps=m.get("steps"),
                local_epochs=m.get("local-epochs"), train_seconds=m.get("train-seconds"),
            )
            epsilon[site] = float(m.get("epsilon-total", 0.0))
            if "train-loss" in m:  # sites send no training loss under DP (it is not accounted)
                train_losses.append(m["train-loss"])
                train_n.append(int(m.get("num-examples", 0)))
        for site, m in entry.evaluate.items():
            sites.setdefault(site, {}).update(
                val_examples=int(m.get("num-examples", 0)), val_positive=int(round(m["num-positive"])) if "num-positive" in m else None,
                auc=m.get("auc"), eval_noise=m.get("eval-noise"), hist_pos=m.get("hist-pos"), hist_neg=m.get("hist-neg"),
                eval_final=bool(m.get("eval-final")),
            )
            sites[site].update({k: v for k, v in m.items() if k.startswith("gate-")})  # intended-use gate (server/gate.py)
            sites[site].update(site_counts(m))  # noised counts as estimates: never more positives than images
            image_counts = {k.removeprefix("ref-"): v for k, v in m.items() if k.startswith("ref-")}
            if image_counts:
                sites[site]["reference_counts"] = image_counts
    labels = tuple(getattr(getattr(strategy, "run", None), "labels", ()))
    return {
        "round": r,
        "pooled_auc": pooled.get("pooled-auc", math.nan),
        **({"labels": per_label(pooled, labels)} if f"pooled-auc-{0}" in pooled else {}),
        "train_loss": weighted_mean(train_losses, train_n) if train_n else None,
        "eval_loss": pooled.get("eval-loss", math.nan),
        "sensitivity": pooled.get("sensitivity", math.nan),
        "specificity": pooled.get("specificity", math.nan),
        "threshold": pooled.get("threshold", 0.5),
        **round_figures(pooled, str(getattr(getattr(strategy, "run", None), "operating_point", "youden"))),
        "epsilon": epsilon,
        "sites": sites,
        "rejected": dict(entry.rejected) if entry else {},
        "failures": list(entry.failures) if entry else [],
        "seconds": seconds,
    }


def per_label(pooled: dict[str, Any], labels: tuple[str, ...]) -> dict[str, dict[str, float]]:
    """{class or finding name: pooled AUC, threshold and threshold_rule (multilabel), sensitivity, specificity, positives, negatives}."""
    out: dict[str, dict[str, float]] = {}
    for c, name in enumerate(labels):
        figures = {field: pooled[f"{key}-{c}"] for field, key in (
            ("auc", "pooled-auc"), ("threshold", "threshold"), ("sensitivity", "sensitivity"),
            ("specificity", "specificity"), ("positives", "positives"), ("negatives", "negatives"))
            if f"{key}-{c}" in pooled}
        if f"pooled-auc-low-{c}" in pooled:  # the AUC's 95% interval, the sites' noise included
            figures["auc_ci"] = [pooled[f"pooled-auc-low-{c}"], pooled[f"pooled-auc-high-{c}"]]
        if f"threshold-rule-{c}" in pooled:  # how the threshold was chosen (common.pooled_metrics.THRESHOLD_RULES)
            figures["threshold_rule"] = THRESHOLD_RULES[int(pooled[f"threshold-rule-{c}"])]
        if figures:
            out[name] = figures
    return out


def auc_reading(rec: dict[str, Any]) -> str:
    """The round's pooled AUC for its log line: an estimate from noised counts, so with its interval."""
    auc, ci = rec.get("pooled_auc"), rec.get("pooled_auc_ci")
    if auc is None or auc != auc:
        return "- (not estimable: a class's noised validation count is not positive this round)"
    if not ci or ci[0] is None or ci[0] != ci[0]:
        return f"{auc:.3f}"
    which = "final evaluation" if rec.get("eval_final") else "noised"
    rough = "; a class's count is within the noise of zero, so the interval is rough" if rec.get("intervals_rough") else ""
    return f"{auc:.3f} (95% CI {ci[0]:.3f}-{ci[1]:.3f}, {which}{rough})"


EPSILON_SITES_LISTED = 8


def epsilon_summary(epsilon: dict[str, float]) -> str:
    """Each site's epsilon for the round's log line; beyond 8 sites, the range and the median.

    A 100-site simulation would otherwise log a 2,000-character line a round; every site's figure
    stays in metrics.json."""
    if len(epsilon) <= EPSILON_SITES_LISTED:
        return ", ".join(f"{k} {v:.2f}" for k, v in sorted(epsilon.items()))
    ranked = sorted(epsilon.items(), key=lambda kv: (kv[1], kv[0]))
    (low, low_eps), (high, high_eps) = ranked[0], ranked[-1]
    median = float(np.median([v for _, v in ranked]))
    return f"{len(ranked)} sites: min {low_eps:.2f} ({low}), median {median:.2f}, max {high_eps:.2f} ({high})"


class RoundKeeper:
    """Keeps every finished round: record, atomic checkpoint, best round so far, metrics.json, early stop."""

    def __init__(self, *, strategy: Any, run_dir: Path, run_name: str, config_map: dict[str, Any],
                 history: list[dict[str, Any]], start_round: int, total_rounds: int, patience: int) -> None:
        self.strategy, self.run_dir, self.run_name = strategy, run_dir, run_name
        self.config_map, self.history = config_map, history
        self.start_round, self.total_rounds, self.patience = start_round, total_rounds, patience
        self.started = time.monotonic()
        self.best_auc = max((h.get("pooled_auc") or -1.0 for h in history), default=-1.0)
        self.since_best = 0
        previous = load_best(run_dir)
        self.best_saved = previous[2] if previous else -1.0

    def after_round(self, server_round: int, weights: dict[str, np.ndarray]) -> dict[str, Any] | None:
        """Round ``server_round`` of this session (0: before the first) is done; returns its record."""
        if server_round == 0:
            return None
        r = server_round + self.start_round
        rec = round_record(self.strategy, r, time.monotonic() - self.started)
        self.started = time.monotonic()
        self.history.append(rec)
        state = strategy_state(self.strategy)
        save_checkpoint(self.run_dir, Checkpoint(r, weights, state, self.history, self.config_map))
        auc = rec["pooled_auc"]
        if auc == auc and auc > self.best_saved:  # the model the sites evaluated: the weight average when on
            save_best(self.run_dir, r, exported_weights(state, weights), auc)
            self.best_saved = auc
        write_metrics(self.run_dir, self.run_name, self.config_map, self.history)
        log.info("round %d/%d: pooled AUC %s, validation loss %.4f, epsilon [%s]%s", r, self.total_rounds,
                 auc_reading(rec), rec["eval_loss"], epsilon_summary(rec["epsilon"]),
                 f", rejected {sorted(rec['rejected'])}" if rec["rejected"] else "")
        if self.patience and auc == auc:
            if auc > self.best_auc + 1e-4:
                self.best_auc, self.since_best = auc, 0
            else:
                self.since_best += 1
                if self.since_best >= self.patience:
                    log.info("early stop: no pooled AUC gain for %d round(s)", self.since_best)
                    raise EarlyStop
        return rec
