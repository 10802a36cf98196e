"""What the sites' noised validation histograms say about a binary model, each figure with its uncertainty.

The coordinator never sees a score: it has each site's histogram of validation scores per class,
every count plus Gaussian noise of the site's ``eval-noise``. Everything it reports from them is
an estimate. :func:`pooled_estimates` gives the pooled AUC, the operating point's threshold and its
sensitivity and specificity, and the number of validation images of each class, each with a 95%
interval that holds both the noise and the sampling of the validation images:

* counts: the noised total of a class sums one noise draw per bin per site, so its standard error
  is ``sqrt(bins * sum(sd_i^2))``, exactly (the count of images itself is not a sample);
* AUC, sensitivity, specificity: a parametric bootstrap. Each draw builds a world in which every
  site's images of a class follow the pooled estimate's distribution (in the site's noised
  numbers), samples the site's images from it, adds each site's noise, and estimates again exactly
  as the coordinator does (common.pooled_metrics.pooled_counts). The estimator's error in those
  worlds (noise, its bias toward 0.5, and sampling) turns the estimate into an interval
  ("basic" bootstrap: estimate minus the error's 97.5th and 2.5th percentiles).

Pure post-processing of what the sites released: no privacy cost.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from common.operating_point import OperatingPoint, bin_position, position_from_counts, rates_at, threshold_from_counts
from common.pooled_metrics import consistent_counts, pooled_counts
from common.roc import _auc_from_counts

#: Bootstrap draws per estimate: the interval's ends move by about 0.005 between seeds at 300.
DRAWS = 300
Z95 = 1.959963984540054


@dataclass(frozen=True)
class Interval:
    """An estimate and its 95% interval (nan when not estimable)."""

    value: float
    low: float
    high: float

    def as_list(self) -> list[float]:
        return [self.low, self.high]

    def text(self, digits: int = 3) -> str:
        """``0.912 (95% CI 0.871-0.944)``; ``-`` when not estimable."""
        if not math.isfinite(self.value):
            return "-"
        return f"{self.value:.{digits}f} (95% CI {self.low:.{digits}f}-{self.high:.{digits}f})"


NAN = Interval(math.nan, math.nan, math.nan)


@dataclass(frozen=True)
class PooledEstimates:
    """The pooled validation figures of one evaluation, from noised histograms."""

    auc: Interval
    threshold: float  # chosen by the operating point on the precision-weighted pool (common.operating_point)
    sensitivity: Interval  # at ``threshold``
    specificity: Interval
    positives: Interval  # validation images of the positive class (a noised count: an estimate)
    negatives: Interval
    pos: NDArray[np.float64]  # the pooled consistent counts per bin (the plain sum, projected)
    neg: NDArray[np.float64]

    @property
    def counts_within_noise(self) -> bool:
        """A class's count cannot be told from zero at 95%: the worlds of the bootstrap are then built on a
        distribution the noise has flattened, and the intervals may be too narrow (say so wherever shown)."""
        return self.positives.low <= 0 or self.negatives.low <= 0


def count_interval(noised_total: float, noise_sd: Sequence[float], bins: int) -> Interval:
    """A class's image count from the sum of noised counts: never below 0, with its exact noise interval."""
    half = Z95 * math.sqrt(bins * float(np.sum(np.square(noise_sd))))
    value = max(0.0, float(noised_total))
    return Interval(value, max(0.0, noised_total - half), max(0.0, noised_total + half))


def plain_counts(pos_rows: ArrayLike, neg_rows: ArrayLike) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """The sites' noised histograms summed per class, then made consistent (common.pooled_metrics.consistent_counts).

    What the reported figures are computed from: every validation image counts once, whichever site
    holds it. The threshold is chosen on common.pooled_metrics.pooled_counts instead, which trades a
    little of that for much less noise.
    """
    return (consistent_counts(np.sum(np.asarray(pos_rows, dtype=np.float64), axis=0)),
            consistent_counts(np.sum(np.asarray(neg_rows, dtype=np.float64), axis=0)))


def signed_auc(pos_rows: ArrayLike, neg_rows: ArrayLike) -> float:
    """The AUC of the summed noised counts as they are, negative ones included, clamped to [0, 1].

    With zero-mean noise in every count the pair counts (numerator and denominator) are unbiased;
    making the counts consistent first leaves noise mass in empty bins, which pulls the AUC toward
    0.5 the more, the larger the noise (a 0.93 model read 0.55 at noise 20 per count in 16 bins).
    nan when a class's noised total is not positive.
    """
    p = np.sum(np.asarray(pos_rows, dtype=np.float64), axis=0)
    n = np.sum(np.asarray(neg_rows, dtype=np.float64), axis=0)
    if p.sum() <= 0 or n.sum() <= 0:
        return math.nan
    return float(np.clip(_auc_from_counts(p, n), 0.0, 1.0))


def _stats(pos_rows: NDArray[np.float64], neg_rows: NDArray[np.float64], position: float) -> NDArray[np.float64]:
    """AUC (:func:`signed_auc`), and sensitivity and specificity at a bin position on the consistent counts."""
    sens, spec = rates_at(*plain_counts(pos_rows, neg_rows), position)
    return np.asarray([signed_auc(pos_rows, neg_rows), float(sens), float(spec)])


def _site_shapes(rows: NDArray[np.float64], pooled: NDArray[np.float64]) -> list[NDArray[np.float64]]:
    """Each site's distribution over the bins for the bootstrap's worlds: its own consistent counts
    (sites differ; a site's noise only widens that difference, so the interval errs wide), the
    pooled one for a site whose counts of the class are all noise."""
    out = []
    for row in rows:
        own = consistent_counts(row)
        out.append(own / own.sum() if own.sum() > 0 else pooled / pooled.sum())
    return out


def pooled_estimates(hists: Sequence[Mapping[str, Sequence[float]]], noise_sd: Sequence[float], edges: ArrayLike,
                     point: OperatingPoint, *, draws: int = DRAWS, seed: int = 0) -> PooledEstimates:
    """Pooled AUC, threshold, sensitivity, specificity and class counts, each with its 95% interval.

    ``noise_sd``: each site's noise per count (its reply's ``eval-noise``). The AUC interval is
    widened by half the share of same-bin pairs on each side: the exact AUC of the scores lies
    within that of the binned one, whatever the order inside a bin.
    """
    e = np.asarray(edges, dtype=np.float64)
    sd = np.asarray(noise_sd, dtype=np.float64)
    weighted = pooled_counts(hists, sd)
    rows = {key: np.asarray([np.asarray(h[key], dtype=np.float64) for h in hists]) for key in ("pos", "neg")}
    pos, neg = plain_counts(rows["pos"], rows["neg"])
    positives = count_interval(float(rows["pos"].sum()), sd, pos.size)
    negatives = count_interval(float(rows["neg"].sum()), sd, pos.size)
    threshold = threshold_from_counts(*weighted, e, point)
    if rows["pos"].sum() <= 0 or rows["neg"].sum() <= 0:  # a class the noise left without images: nothing to say
        return PooledEstimates(NAN, threshold, NAN, NAN, positives, negatives, pos, neg)
    estimate = _stats(rows["pos"], rows["neg"], bin_position(threshold, e))
    if draws <= 0:  # the estimates alone
        auc, sens, spec = (Interval(float(v), math.nan, math.nan) for v in estimate)
        return PooledEstimates(auc, threshold, sens, spec, positives, negatives, pos, neg)
    rng = np.random.default_rng(seed)
    site_n = {key: np.maximum(np.rint(rows[key].sum(axis=1)), 0).astype(np.int64) for key in rows}
    shapes = {"pos": _site_shapes(rows["pos"], pos), "neg": _site_shapes(rows["neg"], neg)}
    errors = np.full((draws, 3), np.nan)
    for d in range(draws):
        world, noised = {}, {}
        for key in ("pos", "neg"):
            sampled = np.stack([rng.multinomial(n, q) for n, q in zip(site_n[key], shapes[key], strict=True)])
            world[key] = sampled.sum(axis=0).astype(np.float64)
            noised[key] = sampled + rng.normal(0.0, 1.0, sampled.shape) * sd[:, None]
        if world["pos"].sum() <= 0 or world["neg"].sum() <= 0:
            continue
        drawn = [{"pos": p, "neg": n} for p, n in zip(noised["pos"], noised["neg"], strict=True)]
        # The threshold is chosen again in every world: the noise that made a threshold look best also
        # flatters its rates (the winner's curse), and the interval must hold that too.
        x = position_from_counts(*pooled_counts(drawn, sd), point)
        errors[d] = _stats(noised["pos"], noised["neg"], x) - _stats(world["pos"][None], world["neg"][None], x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a figure no world could estimate stays nan
        err_high, err_low = np.nanquantile(errors, [0.975, 0.025], axis=0)
    ties = float(np.sum(pos * neg) / (pos.sum() * neg.sum())) / 2.0
    widen = np.asarray([ties, 0.0, 0.0])
    low = np.clip(np.minimum(estimate - err_high, estimate) - widen, 0.0, 1.0)
    high = np.clip(np.maximum(estimate - err_low, estimate) + widen, 0.0, 1.0)
    auc, sens, spec = (Interval(float(estimate[i]), float(low[i]), float(high[i])) for i in range(3))
    return PooledEstimates(auc, threshold, sens, spec, positives, negatives, pos, neg)
