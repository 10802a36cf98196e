"""The binary metrics core (moved out of common/metrics.py, which re-exports every name).

Input checks, the AUC from per-level class counts (Mann-Whitney, ties count half), the ROC curve
and the operating threshold chosen on validation data. Conventions: common/metrics.py.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

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
