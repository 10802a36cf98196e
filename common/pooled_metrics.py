"""Score histograms a site sends, and the metrics the coordinator pools from them.

Moved out of common/metrics.py, which re-exports every name. The coordinator never sees
individual scores: each site sends :func:`score_histograms` (noised with
:func:`noised_histograms`) and the coordinator sums them into a pooled AUC, ROC, threshold,
sensitivity/specificity and loss.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from numpy.typing import ArrayLike, NDArray

from common.roc import MetricsError, _auc_from_counts, _check_binary, _check_probs, _safe_div

# --------------------------------------------------------------------------- histograms (pooled)


#: Bin edges of the evaluation histograms sites send: 16 bins, equal width in logit space between
#: probabilities sigmoid(-10) and sigmoid(10), plus the two open ends. DP-trained heads are often
#: confident (logits beyond +-7 for most images); equal-width bins would lump those into ties,
#: equal logit steps keep the pooled AUC and the threshold resolved there. Few bins, because each
#: is a noised count and every empty bin adds noise.
EVAL_EDGES: NDArray[np.float64] = np.concatenate([[0.0], 1.0 / (1.0 + np.exp(-np.linspace(-10.0, 10.0, 15))), [1.0]])


#: Bin edges of the binary task's released histograms: every other inner edge of :data:`EVAL_EDGES`
#: (logit -8.57 to 8.57 in steps of 2.86), so 8 bins. Each bin of a released histogram carries the
#: same noise however few images it holds, and a sensitivity or specificity sums the noise of every
#: bin on one side of the threshold: fewer, wider bins keep the operating point where the sites'
#: validation data put it (benchmarks/operating_point.py measured 16 bins against 8). A site bins
#: with :data:`EVAL_EDGES` and merges (:func:`merge_bins`): the fine counts never leave it.
BINARY_EDGES: NDArray[np.float64] = np.concatenate([[0.0], EVAL_EDGES[2:-2:2], [1.0]])


def merge_bins(counts: Sequence[float], edges_from: ArrayLike, edges_to: ArrayLike) -> list[float]:
    """Counts over ``edges_from`` summed into the wider bins of ``edges_to`` (a subset of the same edges)."""
    fine, coarse = np.asarray(edges_from, dtype=np.float64), np.asarray(edges_to, dtype=np.float64)
    at = np.searchsorted(fine, coarse)
    if len(counts) != fine.size - 1 or not np.array_equal(fine[np.clip(at, 0, fine.size - 1)], coarse):
        raise MetricsError(f"cannot merge {len(counts)} bins into {coarse.size - 1}: the wide edges must be a subset of the "
                           "fine ones")
    return np.add.reduceat(np.asarray(counts, dtype=np.float64), at[:-1]).tolist()


def consistent_counts(noised: ArrayLike, total: float | None = None) -> NDArray[np.float64]:
    """The non-negative counts nearest (least squares) to ``noised`` that sum to ``total`` (default: their sum).

    A noised count can be negative and an empty bin reads as a few images; clipping at zero adds
    images that were never there. The Euclidean projection onto {x >= 0, sum x = total} removes
    one common amount from every bin that stays positive and zeroes the rest, so the class keeps
    its noised total (an unbiased estimate) and no bin is negative. Post-processing: no privacy cost.
    """
    v = np.asarray(noised, dtype=np.float64)
    t = float(v.sum()) if total is None else float(total)
    if t <= 0 or v.size == 0:
        return np.zeros_like(v)
    u = np.sort(v)[::-1]
    excess = np.cumsum(u) - t
    rho = int(np.flatnonzero(u - excess / np.arange(1, u.size + 1) > 0)[-1])
    return np.maximum(v - excess[rho] / (rho + 1), 0.0)


def pooled_counts(hists: Sequence[Mapping[str, Sequence[float]]],
                  noise_sd: Sequence[float]) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """The pooled (positive, negative) counts per bin from the sites' noised histograms, consistent.

    Per class, the total is the sum of every noised count (unbiased). The shape (the share of the
    class in each bin) is the sites' histograms averaged with weight ``n / (sd^2 + n / bins)``:
    a site's noised count ``n`` of the class over the variance its histogram carries (its noise
    ``sd`` per count, plus about ``n / bins`` of sampling). A site with a handful of images of a
    class sends mostly noise; the plain sum would let it blur the class's distribution as much as
    a site with hundreds (benchmarks/operating_point.py: 86% against 99% of replays keeping the
    held-out sensitivity and specificity within 0.05). When every site has the same distribution
    this is the minimum-variance estimate; large sites weigh a little more than their share
    otherwise. The result is projected onto non-negative counts summing to the total.
    """
    if len(noise_sd) != len(hists):
        raise MetricsError(f"{len(hists)} histograms but {len(noise_sd)} noise levels; give each site's eval-noise")
    _sum_histograms(hists, clip=False)  # the same checks: both classes, one binning, finite counts
    out = []
    for key in ("pos", "neg"):
        rows = np.asarray([np.asarray(h[key], dtype=np.float64) for h in hists])
        total = max(0.0, float(rows.sum()))
        n = np.maximum(rows.sum(axis=1), 0.0)
        weights = n / (np.asarray(noise_sd, dtype=np.float64) ** 2 + n / rows.shape[1])
        shape = consistent_counts((weights[:, None] * rows).sum(axis=0))
        out.append(shape / shape.sum() * total if shape.sum() > 0 else consistent_counts(rows.sum(axis=0), total))
    return out[0], out[1]


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
    (tests/common/test_metrics.py measures both). When a class's signed total is not positive (a
    handful of validation images under noise larger than their counts) the clipped counts are used,
    as before; nan when even those lack a class.
    """
    pos, neg = _sum_histograms(hists, clip=False)
    if pos.sum() <= 0 or neg.sum() <= 0:
        pos, neg = np.clip(pos, 0.0, None), np.clip(neg, 0.0, None)
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


# --------------------------------------------------------------------------- per-finding threshold rule

#: How a finding's decision threshold was chosen (metrics.json ``threshold_rule``; docs/tasks.md).
THRESHOLD_RULES = ("youden", "prevalence", "default")
#: Fewer pooled validation positives than this (a noised count) and Youden's J is not trusted.
MIN_THRESHOLD_POSITIVES = 10.0
#: A Youden threshold in the outermost bins at either end (with EVAL_EDGES: below 7.9e-4 or above
#: 0.9992, logit beyond +-7.1) is not trusted: that is where the noise in empty bins decides.
EXTREME_BINS = 2
#: Nor one whose sensitivity or specificity falls below this: it calls (almost) every image one way.
MIN_RATE = 0.1


def robust_histogram_threshold(hists: Sequence[Mapping[str, Sequence[float]]], edges: ArrayLike,
                               *, min_positives: float = MIN_THRESHOLD_POSITIVES) -> tuple[float, str]:
    """(threshold, rule) for one finding from pooled (noised) histograms; rule is one of :data:`THRESHOLD_RULES`.

    ``youden``: :func:`histogram_threshold`, kept when the signed pooled positives reach
    ``min_positives`` and the threshold is a real operating point: not in the :data:`EXTREME_BINS`
    outermost bins at either end, sensitivity and specificity both at least :data:`MIN_RATE`.
    Otherwise ``prevalence``: the bin edge at which the share of validation images called positive
    is closest to the pooled prevalence P / (P + N), both from the signed noised counts (unbiased:
    zero-mean noise, where clipping each count at zero adds mass to every empty bin). ``default``:
    0.5 when a class's signed total is not positive. benchmarks/threshold_rules.py measures both
    rules on simulated NIH-sized validation sets at eval-noise 10 (docs/tasks.md).
    """
    pos, neg = _sum_histograms(hists, clip=False)
    if pos.sum() <= 0 or neg.sum() <= 0:
        return 0.5, "default"
    e = np.asarray(edges, dtype=np.float64)
    threshold = histogram_threshold(hists, e)
    sens, spec = histogram_rates(hists, threshold, e)
    k = int(np.searchsorted(e, threshold, side="left"))
    interior = EXTREME_BINS < k < pos.size - EXTREME_BINS
    if pos.sum() >= min_positives and interior and min(sens, spec) >= MIN_RATE:
        return threshold, "youden"
    total = pos + neg
    called = np.cumsum(total[::-1])[::-1] / total.sum()  # called[k]: share at or above edge k (signed counts)
    k = 1 + int(np.argmin(np.abs(called[1:] - pos.sum() / total.sum())))  # edge 0 would call every image positive
    return float(e[k]), "prevalence"
