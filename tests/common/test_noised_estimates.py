"""common/noised_estimates.py: estimates from noised histograms carry intervals that hold the truth (issues 20, 24)."""

from __future__ import annotations

import numpy as np
import pytest

from common.metrics import BINARY_EDGES, noised_histograms, roc_auc, score_histograms, sens_spec
from common.noised_estimates import count_interval, pooled_estimates
from common.operating_point import OperatingPoint, bin_position


def _sites(seed: int = 0):
    rng = np.random.default_rng(seed)
    out = []
    for n_pos, n_neg in ((150, 60), (40, 40), (10, 2)):
        y = np.r_[np.ones(n_pos), np.zeros(n_neg)].astype(bool)
        out.append((y, 1.0 / (1.0 + np.exp(-np.where(y, rng.normal(4, 3, y.size), rng.normal(-3, 3, y.size))))))
    return out


def test_a_count_is_never_negative_and_its_interval_is_the_noise_of_its_bins():
    iv = count_interval(-5.0, [4.0, 3.0], 8)
    assert iv.value == 0.0 and iv.low == 0.0 and iv.high == pytest.approx(-5 + 1.96 * np.sqrt(8 * 25), rel=1e-3)


def test_without_noise_the_estimates_are_the_binned_figures_and_the_auc_interval_holds_the_exact_auc():
    sites = _sites()
    hists = [score_histograms(y, p, edges=BINARY_EDGES) for y, p in sites]
    est = pooled_estimates(hists, [1e-9] * 3, BINARY_EDGES, OperatingPoint(), draws=50)
    y, p = np.concatenate([s[0] for s in sites]), np.concatenate([s[1] for s in sites])
    assert est.positives.value == pytest.approx(y.sum()) and est.negatives.value == pytest.approx((~y).sum())
    # Inside a bin the estimate spreads the bin's images evenly: it and the exact sensitivity at the
    # threshold both lie between the exact sensitivities at the bin's two edges.
    k = int(np.floor(bin_position(est.threshold, BINARY_EDGES)))
    at_low, at_high = (sens_spec(y, p, BINARY_EDGES[i])[0] for i in (k, k + 1))
    assert at_high - 1e-12 <= est.sensitivity.value <= at_low + 1e-12
    assert at_high <= sens_spec(y, p, est.threshold)[0] <= at_low
    assert est.auc.low <= roc_auc(y, p) <= est.auc.high  # within-bin ties: the interval holds the exact AUC
    assert est.auc.high - est.auc.low < 0.1


def test_under_noise_the_intervals_hold_the_exact_validation_figures():
    """The old card's AUC interval (sampling only, around a noise-biased estimate) excluded the exact AUC."""
    sites = _sites(1)
    y, p = np.concatenate([s[0] for s in sites]), np.concatenate([s[1] for s in sites])
    exact = [score_histograms(a, b, edges=BINARY_EDGES) for a, b in sites]
    rng = np.random.default_rng(2)
    held = {"auc": 0, "sensitivity": 0}
    draws = 40
    for _ in range(draws):
        est = pooled_estimates([noised_histograms(h, 4.0, rng) for h in exact], [4.0] * 3, BINARY_EDGES, OperatingPoint(),
                               draws=150)
        held["auc"] += est.auc.low <= roc_auc(y, p) <= est.auc.high
        held["sensitivity"] += est.sensitivity.low <= sens_spec(y, p, est.threshold)[0] <= est.sensitivity.high
        assert est.positives.low <= y.sum() + 1e-9 or est.positives.high >= y.sum()
    assert held["auc"] >= 0.85 * draws and held["sensitivity"] >= 0.8 * draws  # 95% nominal; measured in the benchmark
