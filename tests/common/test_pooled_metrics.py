"""The per-finding threshold rule on pooled, noised histograms (common/pooled_metrics.py)."""

from __future__ import annotations

import numpy as np
import pytest

from common.pooled_metrics import (
    BINARY_EDGES,
    EVAL_EDGES,
    MIN_RATE,
    consistent_counts,
    histogram_rates,
    histogram_threshold,
    merge_bins,
    noised_histograms,
    pooled_counts,
    robust_histogram_threshold,
    score_histograms,
)

# Three sites' noised histograms summed, as the coordinator sees a rare, weakly learnt finding: its 16
# positives sit where the negatives do, and the noise left negative mass in the two lowest bins and
# no positive mass there (the NIH Infiltration / Atelectasis case of issue 14).
WEAK = {"pos": [0, 0, 1, 1, 1, 2, 2, 2, 2, 2, 1, 1, 1, 0, 0, 0],
        "neg": [9, 8, 4, 8, 12, 20, 28, 36, 40, 30, 25, 15, 10, 5, 0, 0]}


class TestRobustHistogramThreshold:
    def test_youden_alone_calls_almost_every_image_positive_here(self):
        t = histogram_threshold([WEAK], EVAL_EDGES)
        sens, spec = histogram_rates([WEAK], t, EVAL_EDGES)
        assert t < 1e-3 and spec < MIN_RATE and sens == 1.0  # the old behaviour this rule replaces

    def test_degenerate_roc_falls_back_to_the_prevalence_matched_threshold(self):
        t, rule = robust_histogram_threshold([WEAK], EVAL_EDGES)
        assert rule == "prevalence"
        sens, spec = histogram_rates([WEAK], t, EVAL_EDGES)
        assert t > 0.5 and spec > 0.9
        pos, neg = np.asarray(WEAK["pos"], float), np.asarray(WEAK["neg"], float)
        k = int(np.searchsorted(EVAL_EDGES, t, side="left"))
        called = (pos[k:].sum() + neg[k:].sum()) / (pos.sum() + neg.sum())
        assert abs(called - pos.sum() / (pos.sum() + neg.sum())) < 0.05  # as many called positive as are positive

    def test_an_extreme_bin_is_not_trusted_even_with_fair_rates(self):
        """The NIH DP run's Infiltration: Youden at 1.9e-4 with sensitivity 0.97 and specificity 0.50."""
        hist = {"pos": [0, 0, 6, 5, 5, 5, 5, 5, 5, 5, 5, 4, 0, 0, 0, 0],
                "neg": [70, 60, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 0, 0]}
        assert histogram_threshold([hist], EVAL_EDGES) < 1e-3
        assert min(histogram_rates([hist], histogram_threshold([hist], EVAL_EDGES), EVAL_EDGES)) >= MIN_RATE
        t, rule = robust_histogram_threshold([hist], EVAL_EDGES)
        assert rule == "prevalence" and 1e-3 < t < 0.999

    def test_a_well_learnt_finding_keeps_youden(self):
        rng = np.random.default_rng(0)
        y = rng.random(2000) < 0.2
        p = 1 / (1 + np.exp(-(rng.normal(0, 1.5, 2000) + 3.0 * y - 1.5)))
        hist = noised_histograms(score_histograms(y, p, edges=EVAL_EDGES), 10.0, np.random.default_rng(1))
        t, rule = robust_histogram_threshold([hist], EVAL_EDGES)
        assert rule == "youden" and t == histogram_threshold([hist], EVAL_EDGES)
        assert min(histogram_rates([hist], t, EVAL_EDGES)) > 0.6

    def test_too_few_positives_is_not_trusted_even_when_the_roc_looks_fine(self):
        hist = {"pos": [0] * 12 + [3, 2, 1, 0], "neg": [0, 0, 5, 20, 60, 80, 60, 20, 5] + [0] * 7}
        assert robust_histogram_threshold([hist], EVAL_EDGES)[1] == "prevalence"
        assert robust_histogram_threshold([hist], EVAL_EDGES, min_positives=5)[1] == "youden"

    @pytest.mark.parametrize("hist", [{"pos": [0] * 16, "neg": [5] * 16}, {"pos": [-9.0] + [0.5] * 15, "neg": [5] * 16}])
    def test_an_absent_class_gives_the_default(self, hist):
        assert robust_histogram_threshold([hist], EVAL_EDGES) == (0.5, "default")


class TestConsistentCounts:
    """Issue 20: noised counts made non-negative while keeping each class's noised total."""

    def test_non_negative_summing_to_the_noised_total(self):
        noised = np.array([5.0, -3.0, 2.0, -1.0, 10.0])
        out = consistent_counts(noised)
        assert (out >= 0).all() and out.sum() == pytest.approx(noised.sum())
        assert np.array_equal(consistent_counts([1.0, 0.0, 4.0]), [1.0, 0.0, 4.0])  # already consistent: unchanged
        assert consistent_counts([-4.0, 1.0]).sum() == 0.0  # a negative total: nothing

    def test_clipping_would_add_images_that_were_never_there(self):
        noised = np.array([-6.0, 3.0, -5.0, 40.0, -2.0, 4.0])
        assert np.clip(noised, 0, None).sum() > noised.sum() == pytest.approx(consistent_counts(noised).sum())


def test_merge_bins_sums_the_fine_bins_of_each_wide_one():
    fine = list(range(16))
    assert merge_bins(fine, EVAL_EDGES, BINARY_EDGES) == [1.0, 5.0, 9.0, 13.0, 17.0, 21.0, 25.0, 29.0]
    with pytest.raises(ValueError, match="subset"):
        merge_bins(fine, EVAL_EDGES, np.linspace(0, 1, 9))


def test_precision_weighting_keeps_a_small_noisy_site_from_blurring_the_pooled_distribution():
    """A site with 3 negatives sends 8 noised counts: summed as they are, they smear noise over every bin."""
    rng = np.random.default_rng(0)
    big = {"pos": np.zeros(8), "neg": np.array([0, 0, 60, 100, 30, 10, 0, 0.0])}
    tiny = {"pos": np.zeros(8), "neg": np.array([0, 0, 1, 2, 0, 0, 0, 0.0])}
    big["pos"][5:] = [50, 100, 80]
    tiny["pos"][6] = 3
    truth = (big["neg"] + tiny["neg"]) / (big["neg"] + tiny["neg"]).sum()
    err_plain, err_weighted = [], []
    for _ in range(200):
        sent = [noised_histograms(h, 4.0, rng) for h in (big, tiny)]
        plain = consistent_counts(np.sum([s["neg"] for s in sent], axis=0))
        _, weighted = pooled_counts(sent, [4.0, 4.0])
        err_plain.append(np.abs(plain / plain.sum() - truth).sum())
        err_weighted.append(np.abs(weighted / weighted.sum() - truth).sum())
        assert weighted.sum() == pytest.approx(max(0.0, sum(np.sum(s["neg"]) for s in sent)))  # the noised total kept
    assert np.mean(err_weighted) < 0.8 * np.mean(err_plain)
