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
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

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
    "histogram_rates",
    "histogram_loss",
    "EVAL_EDGES",
    "sens_spec",
    "weighted_mean",
]

ThresholdMethod = Literal["youden", "sensitivity"]


class MetricsError(ValueError):
    """Inputs a metric cannot be computed from (shape, label values, out-of-range scores)."""


# --------------------------------------------------------------------------- input checks


def _check_binary(y_true: ArrayLike, scores: ArrayLike, *, what: str = "scores") -> tuple[NDArray[np.bool_], NDArray[np.float64]]:
    """Return (labels as bool, scores as float64), both 1-D, after checking they are usable.

    A trailing singleton axis ([N,1], as a binary model outputs) is accepted for either.
    """
    y = np.asarray(y_true)
    s = np.asarray(scores, dtype=np.float64)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if s.ndim == 2 and s.shape[1] == 1:
        s = s[:, 0]
    if y.ndim != 1 or s.ndim != 1:
        raise MetricsError(
            f"binary metrics need 1-D y_true and {what} (or [N,1]); got shapes {y.shape} and {s.shape}. For several classes use macro_auc."
        )
    if y.shape[0] != s.shape[0]:
        raise MetricsError(f"y_true has {y.shape[0]} samples but {what} has {s.shape[0]}; pass one score per label")
    if y.size and not np.isin(y, (0, 1)).all():
        bad = np.unique(y[~np.isin(y, (0, 1))])[:5]
        raise MetricsError(
            f"y_true must hold only 0/1 (or bool) for a binary metric; found {bad.tolist()}. "
            "Map the positive finding to 1 and everything else to 0."
        )
    if not np.isfinite(s).all():
        raise MetricsError(
            f"{what} contain {int((~np.isfinite(s)).sum())} non-finite values (nan/inf); check the model output before computing metrics"
        )
    return y.astype(bool), s


def _check_probs(probs: NDArray[np.float64]) -> None:
    if probs.size and (probs.min() < 0.0 or probs.max() > 1.0):
        raise MetricsError(
            f"probabilities must lie in [0,1]; got range [{probs.min():.4g}, {probs.max():.4g}]. Apply sigmoid/softmax to logits first."
        )


def _safe_div(num: float, den: float) -> float:
    return float(num) / float(den) if den else math.nan


# --------------------------------------------------------------------------- AUC core


def _auc_from_counts(pos: NDArray[Any], neg: NDArray[Any]) -> NDArray[np.float64]:
    """AUC from per-level class counts ordered by ascending score (last axis = levels).

    Each level is a group of tied scores (a distinct value, or a histogram bin). A positive beats
    every negative at lower levels and ties (counts 1/2) with negatives at its own level. Works on
    stacked rows (bootstrap) as well as on a single pair of count vectors; nan where a class is
    empty.
    """
    pos = np.asarray(pos, dtype=np.float64)
    neg = np.asarray(neg, dtype=np.float64)
    neg_below = np.cumsum(neg, axis=-1) - neg
    wins = np.sum(pos * (neg_below + 0.5 * neg), axis=-1)
    n_pairs = pos.sum(axis=-1) * neg.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n_pairs > 0, wins / np.where(n_pairs > 0, n_pairs, 1.0), np.nan)


def _level_counts(y: NDArray[np.bool_], s: NDArray[np.float64]) -> tuple[NDArray[np.float64], NDArray[np.int64], NDArray[np.int64]]:
    """Distinct scores ascending, with the number of positives and negatives at each."""
    levels, inverse = np.unique(s, return_inverse=True)
    pos = np.bincount(inverse, weights=y, minlength=levels.size).astype(np.int64)
    neg = np.bincount(inverse, weights=~y, minlength=levels.size).astype(np.int64)
    return levels, pos, neg


def roc_auc(y_true: ArrayLike, scores: ArrayLike) -> float:
    """Area under the ROC curve (Mann-Whitney U / (P*N), ties count half); nan if a class is absent."""
    y, s = _check_binary(y_true, scores)
    _, pos, neg = _level_counts(y, s)
    return float(_auc_from_counts(pos, neg))


def roc_curve(y_true: ArrayLike, scores: ArrayLike) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
    """ROC points (fpr, tpr, thresholds), one per distinct score, thresholds descending.

    Point i is the operating point of ``score >= thresholds[i]``; the first point is (0, 0) with
    threshold +inf (nothing predicted positive), the last is (1, 1). fpr (tpr) is nan throughout
    when there are no negatives (positives).
    """
    y, s = _check_binary(y_true, scores)
    levels, pos, neg = _level_counts(y, s)
    tp = np.concatenate([[0], np.cumsum(pos[::-1])])
    fp = np.concatenate([[0], np.cumsum(neg[::-1])])
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    tpr = tp / n_pos if n_pos else np.full(tp.shape, np.nan)
    fpr = fp / n_neg if n_neg else np.full(fp.shape, np.nan)
    thresholds = np.concatenate([[np.inf], levels[::-1]])
    return fpr.astype(np.float64), tpr.astype(np.float64), thresholds


# --------------------------------------------------------------------------- operating point


def confusion(y_true: ArrayLike, scores: ArrayLike, threshold: float) -> dict[str, int]:
    """Confusion counts {"tp", "fp", "tn", "fn"} of ``score >= threshold`` (plain ints, JSON-ready)."""
    y, s = _check_binary(y_true, scores)
    pred = s >= threshold
    return {
        "tp": int(np.sum(pred & y)),
        "fp": int(np.sum(pred & ~y)),
        "tn": int(np.sum(~pred & ~y)),
        "fn": int(np.sum(~pred & y)),
    }


def sens_spec(y_true: ArrayLike, scores: ArrayLike, threshold: float) -> tuple[float, float]:
    """(sensitivity, specificity) of ``score >= threshold``; nan for a class that is absent."""
    c = confusion(y_true, scores, threshold)
    return _safe_div(c["tp"], c["tp"] + c["fn"]), _safe_div(c["tn"], c["tn"] + c["fp"])


def choose_threshold(
    y_true: ArrayLike,
    scores: ArrayLike,
    *,
    method: ThresholdMethod = "youden",
    target_sensitivity: float = 0.9,
) -> float:
    """Pick an operating threshold on *validation* data (never on the test set it is reported on).

    ``method="youden"`` maximises sensitivity + specificity - 1 (the lowest such threshold when
    several tie, i.e. the most sensitive one). ``method="sensitivity"`` returns the highest
    threshold whose sensitivity reaches ``target_sensitivity`` (screening use: miss few positives).
    The returned value is one of the observed scores, used as ``score >= threshold``.
    """
    y, s = _check_binary(y_true, scores)
    if y.all() or not y.any():
        raise MetricsError(
            f"choose_threshold needs both classes in the validation data; got {int(y.sum())} "
            f"positives of {y.size}. Use a larger validation split or a fixed threshold."
        )
    fpr, tpr, thresholds = roc_curve(y, s)
    fpr, tpr, thresholds = fpr[1:], tpr[1:], thresholds[1:]  # drop the +inf "predict none" point
    if method == "youden":
        j = tpr - fpr
        idx = int(np.flatnonzero(j == j.max())[-1])
    elif method == "sensitivity":
        if not 0.0 < target_sensitivity <= 1.0:
            raise MetricsError(f"target_sensitivity must be in (0, 1]; got {target_sensitivity}")
        idx = int(np.flatnonzero(tpr >= target_sensitivity - 1e-12)[0])
    else:
        raise MetricsError(f"unknown threshold method {method!r}; expected 'youden' or 'sensitivity'")
    return float(thresholds[idx])


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


# --------------------------------------------------------------------------- histograms (pooled)


#: Bin edges of the evaluation histograms sites send: 16 bins, equal width in logit space between
#: probabilities sigmoid(-10) and sigmoid(10), plus the two open ends. DP-trained heads are often
#: confident (logits beyond +-7 for most images); equal-width bins would lump those into ties,
#: equal logit steps keep the pooled AUC and the threshold resolved there. Few bins, because each
#: is a noised count and every empty bin adds noise.
EVAL_EDGES: NDArray[np.float64] = np.concatenate([[0.0], 1.0 / (1.0 + np.exp(-np.linspace(-10.0, 10.0, 15))), [1.0]])


def score_histograms(y_true: ArrayLike, probs: ArrayLike, *, bins: int = 200,
                     edges: ArrayLike | None = None) -> dict[str, list[int]]:
    """Per-class counts of positive-class probabilities in ``bins`` equal-width bins over [0,1].

    What a site sends instead of its scores: ``{"pos": [...], "neg": [...]}`` of plain ints,
    bin k covering [k/bins, (k+1)/bins) and the last bin also holding 1.0. With ``edges``
    (ascending, 0 first and 1 last, e.g. :data:`EVAL_EDGES`) bin k covers [edges[k], edges[k+1]).
    Binary tasks only.
    """
    y, p = _check_binary(y_true, probs, what="probs")
    _check_probs(p)
    if edges is not None:
        e = np.asarray(edges, dtype=np.float64)
        bins = e.size - 1
        idx = np.clip(np.searchsorted(e, p, side="right") - 1, 0, bins - 1)
    else:
        if bins < 1:
            raise MetricsError(f"bins must be >= 1; got {bins}")
        idx = np.minimum((p * bins).astype(np.int64), bins - 1)
    return {
        "pos": np.bincount(idx[y], minlength=bins).astype(int).tolist(),
        "neg": np.bincount(idx[~y], minlength=bins).astype(int).tolist(),
    }


def noised_histograms(hist: Mapping[str, Sequence[int]], sigma: float, generator: np.random.Generator) -> dict[str, list[float]]:
    """The Gaussian mechanism on a site's score histograms: N(0, sigma^2) added to every count.

    One validation image moves one count of one histogram by 1 (or two counts when its score
    changes bin): L2 sensitivity sqrt(2) for a model the coordinator chooses, so each release is
    a Gaussian mechanism with noise multiplier ``sigma / sqrt(2)`` (client/round.py charges it).
    """
    return {k: (np.asarray(hist[k], dtype=np.float64) + generator.normal(0.0, sigma, len(hist[k]))).tolist()
            for k in ("pos", "neg")}


HISTOGRAM_SENSITIVITY = math.sqrt(2.0)


def histogram_threshold(hists: Sequence[Mapping[str, Sequence[float]]], edges: ArrayLike | None = None) -> float:
    """The bin edge maximising sensitivity + specificity - 1 on pooled histograms (Youden's J).

    Predicting positive for bins >= k gives sensitivity pos[k:]/P and specificity neg[:k]/N; the
    threshold is the lower edge of bin k (``edges``, or k/bins for equal-width bins). 0.5 when a
    class is absent.
    """
    pos, neg = _sum_histograms(hists)
    bins = pos.size
    e = np.asarray(edges, dtype=np.float64) if edges is not None else np.linspace(0.0, 1.0, bins + 1)
    if e.size != bins + 1:
        raise MetricsError(f"{e.size} edges for {bins} bins; pass the edges the histograms were made with")
    if pos.sum() <= 0 or neg.sum() <= 0:
        return 0.5
    sens = np.cumsum(pos[::-1])[::-1] / pos.sum()
    spec = np.concatenate([[0.0], np.cumsum(neg)[:-1]]) / neg.sum()
    k = int(np.argmax(sens + spec - 1.0))
    return float(e[k])


def histogram_rates(hists: Sequence[Mapping[str, Sequence[float]]], threshold: float, edges: ArrayLike) -> tuple[float, float]:
    """(sensitivity, specificity) of 'positive when score >= threshold' on pooled histograms."""
    pos, neg = _sum_histograms(hists)
    e = np.asarray(edges, dtype=np.float64)
    k = int(np.clip(np.searchsorted(e, threshold, side="left"), 0, pos.size))
    return _safe_div(float(pos[k:].sum()), float(pos.sum())), _safe_div(float(neg[:k].sum()), float(neg.sum()))


def histogram_loss(hists: Sequence[Mapping[str, Sequence[float]]], edges: ArrayLike) -> float:
    """Approximate binary cross-entropy from pooled histograms: each score at its bin's logit midpoint."""
    pos, neg = _sum_histograms(hists)
    e = np.clip(np.asarray(edges, dtype=np.float64), 1e-4, 1 - 1e-4)
    logit = np.log(e / (1 - e))
    mid = 1.0 / (1.0 + np.exp(-(logit[:-1] + logit[1:]) / 2.0))
    total = pos.sum() + neg.sum()
    if total <= 0:
        return math.nan
    return float(-(pos * np.log(mid) + neg * np.log(1 - mid)).sum() / total)


def _sum_histograms(hists: Sequence[Mapping[str, Sequence[int]]], *, clip: bool = True) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Sum site histograms after checking they share one binning (negative noised sums clipped at 0 with ``clip``)."""
    if not hists:
        raise MetricsError("no histograms to pool; pass at least one site's score_histograms()")
    lengths = set()
    for i, h in enumerate(hists):
        if "pos" not in h or "neg" not in h:
            raise MetricsError(f"histogram #{i} lacks 'pos'/'neg' (has {sorted(h)}); produce it with score_histograms()")
        lengths.update({len(h["pos"]), len(h["neg"])})
    if len(lengths) != 1:
        raise MetricsError(
            f"site histograms use different bin counts {sorted(lengths)}; every site must use the same `bins` (the run config's value)"
        )
    pos = np.sum([np.asarray(h["pos"], dtype=np.float64) for h in hists], axis=0)
    neg = np.sum([np.asarray(h["neg"], dtype=np.float64) for h in hists], axis=0)
    if not (np.isfinite(pos).all() and np.isfinite(neg).all()):
        raise MetricsError("histogram counts must be finite numbers")
    if not clip:
        return pos, neg
    # Noised counts (noised_histograms) can dip below zero in a bin; a count is never negative.
    return np.clip(pos, 0.0, None), np.clip(neg, 0.0, None)


def pooled_auc_from_histograms(hists: Sequence[Mapping[str, Sequence[int]]]) -> float:
    """AUC over all sites' samples from their summed histograms (same-bin pairs count half).

    The noised counts are summed as they are, negative ones included, and only the result is
    clamped to [0, 1]: with independent zero-mean noise in every count, the pair counts are then
    unbiased. Clipping each count at zero first (what the ROC and the threshold do) adds positive
    noise to every empty bin and pulled a 0.95 model to about 0.78 at the default eval-noise
    (tests/common/test_metrics.py measures both). nan when the pooled data lack a class.
    """
    pos, neg = _sum_histograms(hists, clip=False)
    if pos.sum() <= 0 or neg.sum() <= 0:
        return float("nan")
    return float(np.clip(_auc_from_counts(pos, neg), 0.0, 1.0))


def pooled_roc_from_histograms(
    hists: Sequence[Mapping[str, Sequence[int]]],
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Pooled ROC (fpr, tpr) at the bin edges, from (0, 0) to (1, 1).

    Point i (i = 0..bins) is "predict positive when in one of the top i bins", i.e. threshold
    1 - i/bins. nan for an absent class.
    """
    pos, neg = _sum_histograms(hists)
    tp = np.concatenate([[0], np.cumsum(pos[::-1])]).astype(np.float64)
    fp = np.concatenate([[0], np.cumsum(neg[::-1])]).astype(np.float64)
    tpr = tp / tp[-1] if tp[-1] else np.full(tp.shape, np.nan)
    fpr = fp / fp[-1] if fp[-1] else np.full(fp.shape, np.nan)
    return fpr, tpr


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
