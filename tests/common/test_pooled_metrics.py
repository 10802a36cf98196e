"""The per-finding threshold rule on pooled, noised histograms (common/pooled_metrics.py)."""

from __future__ import annotations

import numpy as np
import pytest

from common.pooled_metrics import (
    EVAL_EDGES,
    MIN_RATE,
    histogram_rates,
    histogram_threshold,
    noised_histograms,
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
