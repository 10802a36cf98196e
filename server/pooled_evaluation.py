"""The coordinator's reading of a binary evaluation round: estimates from noised histograms, with intervals.

The sites' replies hold score histograms with noise (common/noised_estimates.py says what the
coordinator can and cannot know from them). This module turns one round's replies into the
MetricRecord the strategy returns (flat keys, numbers only) and that record into the round's
entry in metrics.json (server/rounds.py); every figure comes with its 95% interval, and the
class counts are labelled estimates everywhere they are shown.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from common.noised_estimates import count_interval, pooled_estimates
from common.operating_point import OperatingPoint
from common.pooled_metrics import BINARY_EDGES, EVAL_EDGES, histogram_loss

#: A reply without ``eval-noise`` (a site of an older fedxray) is taken at the old default.
DEFAULT_EVAL_NOISE = 10.0


def release_edges(bins: int) -> np.ndarray:
    """The bin edges of a binary reply with ``bins`` bins: the operating point's 8, or the 16 older sites sent."""
    return BINARY_EDGES if bins == BINARY_EDGES.size - 1 else EVAL_EDGES


def site_estimates(values: Mapping[str, Any]) -> dict[str, float]:
    """One site's noised class counts, never negative and never more positives than images, and its AUC."""
    pos = np.asarray(values["hist-pos"], dtype=np.float64)
    neg = np.asarray(values["hist-neg"], dtype=np.float64)
    sd = float(values.get("eval-noise", DEFAULT_EVAL_NOISE))
    est = pooled_estimates([{"pos": pos, "neg": neg}], [sd], release_edges(pos.size), OperatingPoint(), draws=0)
    return {"auc": est.auc.value, "num-positive": est.positives.value, "num-negative": est.negatives.value,
            "count-sd": sd * math.sqrt(pos.size)}


def binary_pooled(hists: Sequence[Mapping[str, Sequence[float]]], noise_sd: Sequence[float], point: OperatingPoint,
                  *, final: bool) -> dict[str, float]:
    """The pooled binary figures of a round as MetricRecord keys (pooled-auc, its -low / -high, threshold, ...)."""
    edges = release_edges(len(hists[0]["pos"]))
    est = pooled_estimates(hists, noise_sd, edges, point)
    out: dict[str, float] = {"threshold": est.threshold, "eval-final": float(final),
                             "eval-noise-pooled": float(math.sqrt(np.sum(np.square(noise_sd)))),
                             "counts-within-noise": float(est.counts_within_noise)}
    for key, interval in (("pooled-auc", est.auc), ("sensitivity", est.sensitivity), ("specificity", est.specificity),
                          ("positives", est.positives), ("negatives", est.negatives)):
        out[key], out[f"{key}-low"], out[f"{key}-high"] = interval.value, interval.low, interval.high
    out["eval-loss"] = histogram_loss([{"pos": est.pos, "neg": est.neg}], edges)
    return out


def class_auc_interval(c: str, hists: Sequence[tuple[Mapping[str, Sequence[float]], float]]) -> dict[str, float]:
    """A class's (or finding's) one-vs-rest pooled AUC with its interval, noise included: ``pooled-auc-<c>`` and
    ``pooled-auc-low-<c>`` / ``-high-<c>`` (common/noised_estimates.py; the AUC from consistent counts, as for a
    binary model, so that the interval is around the figure shown). ``hists``: each site's histograms of the
    class with its noise std."""
    est = pooled_estimates([h for h, _ in hists], [sd for _, sd in hists], release_edges(len(hists[0][0]["pos"])),
                           OperatingPoint(), draws=CLASS_DRAWS)
    return {f"pooled-auc-{c}": est.auc.value, f"pooled-auc-low-{c}": est.auc.low, f"pooled-auc-high-{c}": est.auc.high}


#: Fewer draws per class than for a binary model's one AUC: a multilabel model has a dozen findings.
CLASS_DRAWS = 150


def round_figures(pooled: Mapping[str, float], operating_point: str) -> dict[str, Any]:
    """The uncertainty of a binary round for its metrics.json entry (keys added beside pooled_auc and the rest)."""
    if "pooled-auc-low" not in pooled:
        return {}

    def ci(key: str) -> list[float]:
        return [pooled[f"{key}-low"], pooled[f"{key}-high"]]

    return {
        "pooled_auc_ci": ci("pooled-auc"), "sensitivity_ci": ci("sensitivity"), "specificity_ci": ci("specificity"),
        # Noised counts: estimates with their 95% interval, never facts.
        "validation_counts": {"positives": pooled["positives"], "positives_ci": ci("positives"),
                              "negatives": pooled["negatives"], "negatives_ci": ci("negatives"), "estimate": True},
        "eval_final": bool(pooled.get("eval-final")), "eval_noise_pooled": pooled.get("eval-noise-pooled"),
        # A class's count is within the noise of zero: the intervals above may be too narrow (a coarse routine round).
        "intervals_rough": bool(pooled.get("counts-within-noise")),
        "operating_point": operating_point,
    }


def site_counts(m: Mapping[str, Any]) -> dict[str, Any]:
    """A site's validation counts for its metrics.json entry: estimates (noised), their 95% half-width."""
    if "num-negative" not in m:
        return {}
    pos, neg = float(m["num-positive"]), float(m["num-negative"])
    half = count_interval(0.0, [float(m.get("count-sd", 0.0))], 1).high  # one class's total
    return {"val_examples": int(round(pos + neg)), "val_positive": int(round(pos)), "val_positive_ci95": half,
            "val_examples_ci95": half * math.sqrt(2.0), "val_counts_estimate": True}
