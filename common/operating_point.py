"""The operating point: which threshold turns a binary model's probability into a decision, and why.

One rule, three forms (run setting ``operating-point``, ``fl-client accept --operating-point``):

* ``youden``: maximise sensitivity + specificity - 1 (the balanced default);
* ``sensitivity:X``: the highest threshold whose sensitivity is at least X (screening: miss few);
* ``specificity:X``: the lowest threshold whose specificity is at least X (confirmation: few false alarms).

The federation applies it to the pooled, noised validation histograms (bin edges only); a site
applies it to its own exact scores (``fl-client accept``). A sample is positive when
``score >= threshold``, as everywhere in common/metrics.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

from common.roc import MetricsError, _check_binary, roc_curve

OPERATING_POINT_RULES = ("youden", "sensitivity", "specificity")
#: Where the threshold was set: by the federation (pooled validation data) or by the site (its own).
SET_BY = ("federation", "site")


@dataclass(frozen=True)
class OperatingPoint:
    """A threshold rule: ``rule`` one of :data:`OPERATING_POINT_RULES`, ``target`` in (0, 1) for the rate rules."""

    rule: str = "youden"
    target: float | None = None

    def __str__(self) -> str:
        return self.rule if self.target is None else f"{self.rule}:{self.target:g}"

    def describe(self) -> str:
        """Plain words for a model card or an SR."""
        if self.rule == "youden":
            return "maximises sensitivity + specificity (Youden's J)"
        return f"the {'highest' if self.rule == 'sensitivity' else 'lowest'} threshold with {self.rule} at least {self.target:g}"


def parse_operating_point(text: str) -> OperatingPoint:
    """``youden`` | ``sensitivity:X`` | ``specificity:X`` (X in (0, 1)); ValueError naming the fix otherwise."""
    raw = str(text).strip().lower()
    rule, _, target = raw.partition(":")
    if rule == "youden" and not target:
        return OperatingPoint()
    if rule in ("sensitivity", "specificity") and target:
        try:
            value = float(target)
        except ValueError:
            value = float("nan")
        if 0.0 < value < 1.0:
            return OperatingPoint(rule, value)
    raise ValueError(f"operating point {text!r}: use youden, sensitivity:X or specificity:X with X between 0 and 1 "
                     "(e.g. sensitivity:0.95)")


def threshold_from_counts(pos: ArrayLike, neg: ArrayLike, edges: ArrayLike, point: OperatingPoint) -> float:
    """The rule applied to per-bin counts (ascending bins over ``edges``): the chosen bin edge.

    Only the inner edges are candidates: edge 0 calls every image positive and the last none.
    0.5 when a class has no count.
    """
    p, n = np.asarray(pos, dtype=np.float64), np.asarray(neg, dtype=np.float64)
    e = np.asarray(edges, dtype=np.float64)
    if e.size != p.size + 1 or p.size != n.size:
        raise MetricsError(f"{e.size} edges for {p.size} / {n.size} bins; pass the edges the histograms were made with")
    if p.sum() <= 0 or n.sum() <= 0 or p.size < 2:
        return 0.5
    k = np.arange(1, p.size)
    sens = np.cumsum(p[::-1])[::-1][k] / p.sum()  # positive when in bin k or above
    spec = np.cumsum(n)[k - 1] / n.sum()
    if point.rule == "youden":
        return float(e[k[int(np.argmax(sens + spec))]])
    if point.rule == "sensitivity":
        ok = k[sens >= point.target - 1e-12]
        return float(e[ok[-1] if ok.size else k[0]])
    ok = k[spec >= point.target - 1e-12]
    return float(e[ok[0] if ok.size else k[-1]])


def threshold_from_scores(y_true: ArrayLike, scores: ArrayLike, point: OperatingPoint) -> float:
    """The rule applied to exact scores: one of the observed scores (as common.roc.choose_threshold)."""
    y, s = _check_binary(y_true, scores)
    if y.all() or not y.any():
        raise MetricsError(f"an operating point needs both classes; got {int(y.sum())} positives of {y.size}")
    fpr, tpr, thresholds = roc_curve(y, s)
    fpr, tpr, thresholds = fpr[1:], tpr[1:], thresholds[1:]  # drop the +inf "predict none" point
    if point.rule == "youden":
        j = tpr - fpr
        return float(thresholds[int(np.flatnonzero(j == j.max())[-1])])
    if point.rule == "sensitivity":
        return float(thresholds[int(np.flatnonzero(tpr >= point.target - 1e-12)[0])])
    return float(thresholds[int(np.flatnonzero(1.0 - fpr >= point.target - 1e-12)[-1])])
