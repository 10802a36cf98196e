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
from numpy.typing import ArrayLike, NDArray

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


def _logits(edges: NDArray[np.float64]) -> NDArray[np.float64]:
    e = np.clip(edges, 1e-300, 1.0 - 1e-16)
    return np.log(e) - np.log1p(-e)


def bin_position(threshold: float, edges: ArrayLike) -> float:
    """Where ``threshold`` lies among the bins, as ``k + f``: bin k's lower edge plus the share f of the bin
    (in logit, the scale the bins are equal in) below it. A threshold in an open end bin counts as its edge."""
    e = np.asarray(edges, dtype=np.float64)
    k = int(np.clip(np.searchsorted(e, threshold, side="right") - 1, 0, e.size - 2))
    if threshold <= e[k] or k in (0, e.size - 2):
        return float(k)
    z = _logits(e[k : k + 2])
    return k + float(np.clip((_logits(np.asarray([threshold]))[0] - z[0]) / (z[1] - z[0]), 0.0, 1.0))


def threshold_at(position: float, edges: ArrayLike) -> float:
    """The threshold at a bin position (the inverse of :func:`bin_position`)."""
    e = np.asarray(edges, dtype=np.float64)
    k = int(np.floor(position))
    f = position - k
    if f <= 0 or k in (0, e.size - 2):
        return float(e[min(k, e.size - 1)])
    z = _logits(e[k : k + 2])
    return float(1.0 / (1.0 + np.exp(-(z[0] + f * (z[1] - z[0])))))


def rates_at(pos: ArrayLike, neg: ArrayLike, position: ArrayLike) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """(sensitivity, specificity) of 'positive from bin position ``k + f`` up': the images of bin k spread evenly
    over it in logit. ``position`` a number or an array of them; nan for a class without counts."""
    p, n = np.asarray(pos, dtype=np.float64), np.asarray(neg, dtype=np.float64)
    x = np.asarray(position, dtype=np.float64)
    k = np.minimum(np.floor(x).astype(np.int64), p.size - 1)
    f = x - k
    above = np.concatenate([np.cumsum(p[::-1])[::-1], [0.0]])  # above[k]: positives in bins k and up
    below = np.concatenate([[0.0], np.cumsum(n)])  # below[k]: negatives in bins under k
    with np.errstate(invalid="ignore", divide="ignore"):
        sens = np.clip((above[k + 1] + (1.0 - f) * p[k]) / p.sum(), 0.0, 1.0)  # clip: sums of floats, not above 1
        spec = np.clip((below[k] + f * n[k]) / n.sum(), 0.0, 1.0)
    return sens, spec


#: Steps per bin at which the rate rules look for their threshold between two edges.
STEPS_PER_BIN = 50


def position_from_counts(pos: ArrayLike, neg: ArrayLike, point: OperatingPoint) -> float:
    """The rule applied to per-bin counts: a bin position (see :func:`bin_position`).

    ``youden`` takes the peak of sensitivity + specificity (J) between bin edges: J at the best inner
    edge and its two neighbours, a parabola through them, its vertex (:func:`youden_position`).
    ``sensitivity:X`` / ``specificity:X`` take the point where the rate
    crosses X, the images of the bin it falls in spread evenly over the bin in logit: a bin edge
    alone would jump a whole bin (in the Kermany replay, 2.9 logits) when the noise moves the
    estimate a little across X. Only inner positions are candidates: edge 0 calls every image
    positive and the last none. Position 1 (the lowest inner edge) when a class has no count.
    """
    p, n = np.asarray(pos, dtype=np.float64), np.asarray(neg, dtype=np.float64)
    if p.size != n.size:
        raise MetricsError(f"{p.size} positive and {n.size} negative bins; pass one class's counts per bin each")
    if p.sum() <= 0 or n.sum() <= 0 or p.size < 2:
        return float(max(1, p.size // 2))
    if point.rule == "youden":
        return youden_position(p, n)
    grid = np.linspace(1.0, p.size - 1.0, (p.size - 2) * STEPS_PER_BIN + 1)
    sens, spec = rates_at(p, n, grid)
    if point.rule == "sensitivity":
        ok = grid[sens >= point.target - 1e-12]
        return float(ok[-1] if ok.size else grid[0])
    ok = grid[spec >= point.target - 1e-12]
    return float(ok[0] if ok.size else grid[-1])


def youden_position(pos: NDArray[np.float64], neg: NDArray[np.float64]) -> float:
    """Where sensitivity + specificity (J) peaks, as a bin position, from per-bin counts of both classes.

    Spreading each bin's images evenly makes J linear between edges, so on its own the rule could
    only return an edge: with 8 bins 2.9 logits apart the threshold then jumped a whole bin when the
    noise tipped two edges' J (in the replays of a default Kermany run, a third of the exported
    thresholds fell 2.2 logits above the exact one and missed the held-out sensitivity by 0.05).
    The scores' J is smooth and, near its peak, close to a parabola: the vertex of the parabola
    through J at the best inner edge and its two neighbours estimates the peak between them (the
    usual sub-bin peak estimate). The vertex lies within half a bin of the best edge whenever that
    edge is the highest of the three; the best edge itself when it is the first or last inner
    edge, or when the three values are not concave.
    """
    k = np.arange(1, pos.size)
    sens, spec = rates_at(pos, neg, k)
    j = sens + spec
    i = int(np.argmax(j))
    if i == 0 or i == j.size - 1:
        return float(k[i])
    left, mid, right = j[i - 1], j[i], j[i + 1]
    curvature = left - 2.0 * mid + right
    if not curvature < 0:
        return float(k[i])
    return float(k[i] + np.clip(0.5 * (left - right) / curvature, -0.5, 0.5))


def threshold_from_counts(pos: ArrayLike, neg: ArrayLike, edges: ArrayLike, point: OperatingPoint) -> float:
    """The rule applied to per-bin counts (ascending bins over ``edges``): the threshold
    (:func:`position_from_counts`); 0.5 when a class has no count."""
    p = np.asarray(pos, dtype=np.float64)
    e = np.asarray(edges, dtype=np.float64)
    if e.size != p.size + 1:
        raise MetricsError(f"{e.size} edges for {p.size} bins; pass the edges the histograms were made with")
    if p.sum() <= 0 or np.asarray(neg, dtype=np.float64).sum() <= 0 or p.size < 2:
        return 0.5
    return threshold_at(position_from_counts(p, neg, point), e)


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
