"""Classification metrics for sites, the coordinator and the study (pure numpy).

Why pure numpy: the same code runs inside a hospital's ClientApp, at the coordinator and in the
study, so it must not drag in sklearn. Conventions used throughout:

- ``y_true`` is 0/1 (or bool); ``scores``/``probs`` are the score of the positive class, higher
  means "more likely positive". A sample is predicted positive when ``score >= threshold``.
- AUC is the Mann-Whitney probability that a random positive outscores a random negative, ties
  counting one half. It is ``nan`` when one class is absent (a site with no positives has no
  AUC; callers pool or skip it with :func:`weighted_mean`).
- The coordinator never sees individual scores: each site sends :func:`score_histograms`
  (per-class counts in equal-width probability bins) and the coordinator sums them into a pooled
  AUC with :func:`pooled_auc_from_histograms`. Scores in the same bin count as ties, so the
  pooled AUC differs from the exact one by at most half the fraction of same-bin pairs.

Where each part lives (every name is importable from here): the input checks, AUC, ROC and the
operating threshold in common/roc.py; the histograms and what is pooled from them in
common/pooled_metrics.py; calibration, the bootstrap CI, multi-class AUC and the binary report here.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from common.pooled_metrics import BINARY_EDGES as BINARY_EDGES
from common.pooled_metrics import EVAL_EDGES as EVAL_EDGES
from common.pooled_metrics import HISTOGRAM_SENSITIVITY as HISTOGRAM_SENSITIVITY
from common.pooled_metrics import _sum_histograms as _sum_histograms
from common.pooled_metrics import consistent_counts as consistent_counts
from common.pooled_metrics import histogram_loss as histogram_loss
from common.pooled_metrics import histogram_rates as histogram_rates
from common.pooled_metrics import histogram_threshold as histogram_threshold
from common.pooled_metrics import merge_bins as merge_bins
from common.pooled_metrics import noised_histograms as noised_histograms
from common.pooled_metrics import pooled_auc_from_histograms as pooled_auc_from_histograms
from common.pooled_metrics import pooled_counts as pooled_counts
from common.pooled_metrics import pooled_roc_from_histograms as pooled_roc_from_histograms
from common.pooled_metrics import robust_histogram_threshold as robust_histogram_threshold
from common.pooled_metrics import score_histograms as score_histograms
from common.roc import MetricsError as MetricsError
from common.roc import ThresholdMethod as ThresholdMethod
from common.roc import _auc_from_counts as _auc_from_counts
from common.roc import _check_binary as _check_binary
from common.roc import _check_probs as _check_probs
from common.roc import _level_counts as _level_counts
from common.roc import _safe_div as _safe_div
from common.roc import choose_threshold as choose_threshold
from common.roc import confusion as confusion
from common.roc import roc_auc as roc_auc
from common.roc import roc_curve as roc_curve
from common.roc import sens_spec as sens_spec

logger = logging.getLogger(__name__)

__all__ = [
    "BinaryReport",
    "MetricsError",
    "binary_report",
    "bootstrap_auc_ci",
    "choose_threshold",
    "confusion",
    "expected_calibration_error",
    "macro_auc",
    "pooled_auc_from_histograms",
    "pooled_roc_from_histograms",
    "roc_auc",
    "roc_curve",
    "score_histograms",
    "noised_histograms",
    "histogram_threshold",
    "robust_histogram_threshold",
    "histogram_rates",
    "histogram_loss",
    "EVAL_EDGES",
    "BINARY_EDGES",
    "merge_bins",
    "consistent_counts",
    "pooled_counts",
    "sens_spec",
    "weighted_mean",
]

# --------------------------------------------------------------------------- calibration, CI


def expected_calibration_error(y_true: ArrayLike, probs: ArrayLike, *, bins: int = 15) -> float:
    """ECE: count-weighted mean |observed positive rate - mean probability| over equal-width bins.

    ``probs`` are probabilities of the positive class in [0,1]; 1.0 falls in the last bin.
    Returns nan for empty input.
    """
    y, p = _check_binary(y_true, probs, what="probs")
    _check_probs(p)
    if bins < 1:
        raise MetricsError(f"bins must be >= 1; got {bins}")
    if p.size == 0:
        return math.nan
    idx = np.minimum((p * bins).astype(np.int64), bins - 1)
    sum_p = np.bincount(idx, weights=p, minlength=bins)
    sum_y = np.bincount(idx, weights=y.astype(np.float64), minlength=bins)
    return float(np.sum(np.abs(sum_y - sum_p)) / p.size)


def _per_level(draws: NDArray[np.int64], sorted_levels: NDArray[np.int64], n_levels: int) -> NDArray[np.float64]:
    """Sum draw counts [rows, samples] into [rows, n_levels] by each sample's score level.

    Column j counts how often the j-th sample (in ascending score order, ``sorted_levels``
    being each sample's level, sorted) was drawn.
    """
    out = np.zeros((draws.shape[0], n_levels))
    uniq, starts = np.unique(sorted_levels, return_index=True)
    out[:, uniq] = np.add.reduceat(draws, starts, axis=1)
    return out


def bootstrap_auc_ci(
    y_true: ArrayLike,
    scores: ArrayLike,
    *,
    n: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap (1 - alpha) confidence interval of the AUC, from ``n`` resamples.

    Stratified: positives and negatives are resampled separately, so every resample keeps the
    class counts and has an AUC (as pROC does). Vectorised through per-resample counts of each
    distinct score, so 1000 resamples of a few thousand samples take well under a second.
    (nan, nan) when a class is absent or ``n`` is 0.
    """
    y, s = _check_binary(y_true, scores)
    if not 0.0 < alpha < 1.0:
        raise MetricsError(f"alpha must be in (0, 1); got {alpha}")
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n <= 0 or n_pos == 0 or n_neg == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    levels, inverse = np.unique(s, return_inverse=True)
    pos_level, neg_level = np.sort(inverse[y]), np.sort(inverse[~y])
    aucs = np.empty(n, dtype=np.float64)
    chunk = max(1, 2_000_000 // max(s.size, levels.size))  # bound memory at ~16 MB per array
    for start in range(0, n, chunk):
        rows = min(chunk, n - start)
        # How many times each positive / negative sample is drawn, per resample.
        w_pos = rng.multinomial(n_pos, np.full(n_pos, 1.0 / n_pos), size=rows)
        w_neg = rng.multinomial(n_neg, np.full(n_neg, 1.0 / n_neg), size=rows)
        aucs[start : start + rows] = _auc_from_counts(_per_level(w_pos, pos_level, levels.size), _per_level(w_neg, neg_level, levels.size))
    lo, hi = np.quantile(aucs, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


# --------------------------------------------------------------------------- pooling across sites


def weighted_mean(values: Sequence[float], weights: Sequence[float]) -> float:
    """Mean of ``values`` weighted by ``weights`` (e.g. sample counts); nan values are dropped
    together with their weight. nan if nothing is left."""
    v = np.asarray(values, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    if v.shape != w.shape or v.ndim != 1:
        raise MetricsError(f"values and weights must be 1-D and the same length; got {v.shape} and {w.shape}")
    if (w < 0).any() or not np.isfinite(w).all():
        raise MetricsError("weights must be finite and non-negative (sample counts)")
    keep = ~np.isnan(v)
    total = w[keep].sum()
    return float(np.sum(v[keep] * w[keep]) / total) if total > 0 else math.nan


# --------------------------------------------------------------------------- multi-class


def macro_auc(y_true: ArrayLike, probs: ArrayLike) -> float:
    """Mean one-vs-rest AUC over the classes that have both positives and negatives.

    ``probs`` is [N,C]. ``y_true`` is a [N,C] 0/1 matrix (one-hot for multiclass, multi-hot for
    multilabel; NaN = masked, left out of that class) or [N] integer class indices (converted to
    one-hot). nan if no class qualifies.
    """
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(y_true)
    if p.ndim != 2:
        raise MetricsError(f"macro_auc needs probs of shape [N,C]; got {p.shape}")
    if y.ndim == 1:
        if y.size and (y.min() < 0 or y.max() >= p.shape[1] or not np.all(y == np.round(y))):
            raise MetricsError(f"class indices must be integers in [0, {p.shape[1] - 1}] for {p.shape[1]} probability columns")
        y = np.eye(p.shape[1], dtype=np.int64)[y.astype(np.int64)]
    if y.shape != p.shape:
        raise MetricsError(f"y_true shape {y.shape} does not match probs shape {p.shape}")
    aucs = per_label_auc(y, p)
    valid = [a for a in aucs if not math.isnan(a)]
    if len(valid) < len(aucs):
        logger.debug("macro_auc: %d of %d classes lack a positive or a negative", len(aucs) - len(valid), len(aucs))
    return float(np.mean(valid)) if valid else math.nan


def per_label_auc(y_true: ArrayLike, probs: ArrayLike) -> list[float]:
    """One-vs-rest AUC per column of [N, C] targets; NaN targets (masked findings) are left out of their column."""
    y = np.asarray(y_true, dtype=np.float64)
    p = np.asarray(probs, dtype=np.float64)
    out = []
    for c in range(p.shape[1]):
        known = ~np.isnan(y[:, c])
        out.append(roc_auc(y[known, c], p[known, c]) if known.any() else math.nan)
    return out


# --------------------------------------------------------------------------- report


@dataclass(frozen=True)
class BinaryReport:
    """Everything a site or the study reports for one binary task at one threshold."""

    auc: float  # nan when a class is absent
    auc_ci: tuple[float, float]  # percentile bootstrap 95% CI; (nan, nan) when not computed
    sensitivity: float  # at `threshold`, score >= threshold is positive
    specificity: float
    threshold: float  # chosen on validation data, not here
    ece: float  # expected calibration error, 15 bins
    confusion: dict[str, int] = field(default_factory=dict)  # tp fp tn fn
    n: int = 0  # samples
    n_pos: int = 0  # positives among them

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuple -> list)."""
        out = asdict(self)
        out["auc_ci"] = list(self.auc_ci)
        return out


def binary_report(
    y_true: ArrayLike,
    probs: ArrayLike,
    threshold: float,
    *,
    bootstrap: int = 1000,
    seed: int = 0,
) -> BinaryReport:
    """All binary metrics at once; ``bootstrap`` resamples for the AUC CI (0 skips it)."""
    y, p = _check_binary(y_true, probs, what="probs")
    _check_probs(p)
    sens, spec = sens_spec(y, p, threshold)
    return BinaryReport(
        auc=roc_auc(y, p),
        auc_ci=bootstrap_auc_ci(y, p, n=bootstrap, seed=seed),
        sensitivity=sens,
        specificity=spec,
        threshold=float(threshold),
        ece=expected_calibration_error(y, p),
        confusion=confusion(y, p, threshold),
        n=int(y.size),
        n_pos=int(y.sum()),
    )
