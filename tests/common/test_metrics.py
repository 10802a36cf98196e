"""Tests for common/metrics.py: hand-computed cases, brute-force references, histogram pooling."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from common import metrics as m


def _brute_auc(y: np.ndarray, s: np.ndarray) -> float:
    """All positive/negative pairs, ties count half: the definition, O(P*N)."""
    pos, neg = s[y == 1], s[y == 0]
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size)


def _trapezoid(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2))


def _separable(rng: np.random.Generator, n: int, shift: float) -> tuple[np.ndarray, np.ndarray]:
    """Labels and probabilities in [0,1] with an AUC well inside (0.5, 1)."""
    y = rng.integers(0, 2, n)
    s = 1 / (1 + np.exp(-(rng.normal(size=n) + shift * y - shift / 2)))
    return y, s


class TestRocAuc:
    def test_hand_computed(self) -> None:
        # pairs (pos, neg): (.35,.1) win, (.35,.4) loss, (.8,.1) win, (.8,.4) win -> 3/4
        assert m.roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)

    def test_ties_count_half(self) -> None:
        # pos {.5,.9} vs neg {.5,.2}: tie .5 + 1 + 1 + 1 = 3.5 of 4
        assert m.roc_auc([0, 1, 0, 1], [0.5, 0.5, 0.2, 0.9]) == pytest.approx(0.875)
        assert m.roc_auc([0, 1, 0, 1], [0.3, 0.3, 0.3, 0.3]) == pytest.approx(0.5)

    def test_perfect_inverse_random(self) -> None:
        rng = np.random.default_rng(1)
        y = rng.integers(0, 2, 4000)
        assert m.roc_auc(y, y + rng.uniform(0, 0.5, y.size)) == 1.0
        assert m.roc_auc(y, -(y + rng.uniform(0, 0.5, y.size))) == 0.0
        assert abs(m.roc_auc(y, rng.uniform(size=y.size)) - 0.5) < 0.03

    def test_matches_brute_force_with_many_ties(self) -> None:
        rng = np.random.default_rng(2)
        y = rng.integers(0, 2, 300)
        s = rng.integers(0, 7, 300) + y  # 8 levels, heavy ties
        assert m.roc_auc(y, s) == pytest.approx(_brute_auc(y, s), abs=1e-12)

    def test_invariant_to_monotone_transform(self) -> None:
        y, s = _separable(np.random.default_rng(3), 500, 1.0)
        assert m.roc_auc(y, s) == pytest.approx(m.roc_auc(y, np.log(s) * 3 + 7))

    def test_one_class_is_nan(self) -> None:
        assert math.isnan(m.roc_auc([1, 1, 1], [0.1, 0.2, 0.3]))
        assert math.isnan(m.roc_auc([0, 0], [0.1, 0.2]))
        assert math.isnan(m.roc_auc([], []))

    def test_accepts_bool_and_column_vectors(self) -> None:
        y = np.array([[False], [False], [True], [True]])
        s = np.array([[0.1], [0.4], [0.35], [0.8]])
        assert m.roc_auc(y, s) == pytest.approx(0.75)

    @pytest.mark.parametrize(
        ("y", "s", "match"),
        [
            ([0, 1, 2], [0.1, 0.2, 0.3], "0/1"),
            ([0, 1], [0.1, 0.2, 0.3], "samples"),
            ([0, 1], [0.1, float("nan")], "non-finite"),
            (np.zeros((3, 2)), np.zeros((3, 2)), "macro_auc"),
        ],
    )
    def test_rejects_bad_input(self, y: object, s: object, match: str) -> None:
        with pytest.raises(m.MetricsError, match=match):
            m.roc_auc(y, s)  # type: ignore[arg-type]


class TestRocCurve:
    def test_hand_computed(self) -> None:
        fpr, tpr, thr = m.roc_curve([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
        np.testing.assert_allclose(fpr, [0, 0, 0.5, 0.5, 1])
        np.testing.assert_allclose(tpr, [0, 0.5, 0.5, 1, 1])
        np.testing.assert_allclose(thr, [np.inf, 0.8, 0.4, 0.35, 0.1])

    def test_area_equals_auc_with_ties(self) -> None:
        rng = np.random.default_rng(4)
        y = rng.integers(0, 2, 500)
        s = np.round(rng.normal(size=500) + y, 1)
        fpr, tpr, _ = m.roc_curve(y, s)
        assert _trapezoid(fpr, tpr) == pytest.approx(m.roc_auc(y, s), abs=1e-12)

    def test_points_match_sens_spec(self) -> None:
        y, s = _separable(np.random.default_rng(5), 200, 1.0)
        fpr, tpr, thr = m.roc_curve(y, s)
        for i in (1, 50, 120, len(thr) - 1):
            sens, spec = m.sens_spec(y, s, thr[i])
            assert sens == pytest.approx(tpr[i]) and 1 - spec == pytest.approx(fpr[i])

    def test_no_negatives_gives_nan_fpr(self) -> None:
        fpr, tpr, _ = m.roc_curve([1, 1], [0.2, 0.7])
        assert np.isnan(fpr).all() and tpr[-1] == 1.0


class TestOperatingPoint:
    def test_confusion_and_sens_spec(self) -> None:
        y, s = [1, 1, 0, 0, 1], [0.9, 0.4, 0.6, 0.1, 0.7]
        assert m.confusion(y, s, 0.5) == {"tp": 2, "fp": 1, "tn": 1, "fn": 1}
        sens, spec = m.sens_spec(y, s, 0.5)
        assert (sens, spec) == (pytest.approx(2 / 3), pytest.approx(0.5))

    def test_score_equal_to_threshold_is_positive(self) -> None:
        assert m.confusion([1, 0], [0.5, 0.5], 0.5) == {"tp": 1, "fp": 1, "tn": 0, "fn": 0}

    def test_confusion_is_json_ready(self) -> None:
        json.dumps(m.confusion(np.array([1, 0]), np.array([0.7, 0.2]), 0.5))

    def test_absent_class_gives_nan(self) -> None:
        sens, spec = m.sens_spec([0, 0], [0.2, 0.7], 0.5)
        assert math.isnan(sens) and spec == 0.5


class TestChooseThreshold:
    def test_youden_hand_computed(self) -> None:
        # J = .5 at thresholds .8 and .35: the lower (more sensitive) one is chosen
        assert m.choose_threshold([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.35)

    def test_separable_picks_a_perfect_cut(self) -> None:
        y = np.array([0, 0, 0, 1, 1])
        s = np.array([0.1, 0.2, 0.3, 0.7, 0.9])
        t = m.choose_threshold(y, s)
        assert m.sens_spec(y, s, t) == (1.0, 1.0)

    def test_target_sensitivity(self) -> None:
        y, s = _separable(np.random.default_rng(6), 1000, 1.5)
        t = m.choose_threshold(y, s, method="sensitivity", target_sensitivity=0.9)
        sens, _ = m.sens_spec(y, s, t)
        assert sens >= 0.9
        # the highest such threshold: the next observed score above it misses the target
        above = np.unique(s[s > t])[0]
        assert m.sens_spec(y, s, above)[0] < 0.9

    def test_needs_both_classes(self) -> None:
        with pytest.raises(m.MetricsError, match="both classes"):
            m.choose_threshold([1, 1, 1], [0.2, 0.5, 0.9])

    def test_unknown_method(self) -> None:
        with pytest.raises(m.MetricsError, match="unknown threshold method"):
            m.choose_threshold([0, 1], [0.2, 0.9], method="f1")  # type: ignore[arg-type]


class TestCalibration:
    def test_hand_computed(self) -> None:
        # bin .2: |1 - .4| ; bin .8: |2 - 1.6| -> (0.6 + 0.4) / 4
        ece = m.expected_calibration_error([0, 1, 1, 1], [0.2, 0.2, 0.8, 0.8], bins=5)
        assert ece == pytest.approx(0.25)

    def test_perfectly_calibrated_is_near_zero(self) -> None:
        rng = np.random.default_rng(7)
        p = rng.uniform(size=200_000)
        y = rng.uniform(size=p.size) < p
        assert m.expected_calibration_error(y, p) < 0.01

    def test_overconfident_is_large(self) -> None:
        rng = np.random.default_rng(8)
        p = rng.uniform(size=20_000)
        y = rng.uniform(size=p.size) < p
        overconfident = np.where(p > 0.5, 0.99, 0.01)
        assert m.expected_calibration_error(y, overconfident) > 0.2

    def test_probability_one_is_counted(self) -> None:
        assert m.expected_calibration_error([1, 0], [1.0, 0.0]) == pytest.approx(0.0)

    def test_rejects_logits(self) -> None:
        with pytest.raises(m.MetricsError, match=r"\[0,1\]"):
            m.expected_calibration_error([0, 1], [-2.0, 3.0])


class TestBootstrap:
    def test_contains_auc_and_is_reproducible(self) -> None:
        y, s = _separable(np.random.default_rng(9), 400, 1.0)
        lo, hi = m.bootstrap_auc_ci(y, s, n=500, seed=3)
        assert lo < m.roc_auc(y, s) < hi
        assert (lo, hi) == m.bootstrap_auc_ci(y, s, n=500, seed=3)
        assert (lo, hi) != m.bootstrap_auc_ci(y, s, n=500, seed=4)

    def test_narrows_with_sample_size(self) -> None:
        rng = np.random.default_rng(10)
        small = m.bootstrap_auc_ci(*_separable(rng, 100, 1.0), n=500)
        large = m.bootstrap_auc_ci(*_separable(rng, 3000, 1.0), n=500)
        assert (large[1] - large[0]) < 0.5 * (small[1] - small[0])

    def test_lower_confidence_gives_narrower_interval(self) -> None:
        y, s = _separable(np.random.default_rng(11), 300, 1.0)
        ci95 = m.bootstrap_auc_ci(y, s, n=500, alpha=0.05)
        ci50 = m.bootstrap_auc_ci(y, s, n=500, alpha=0.5)
        assert ci95[0] < ci50[0] < ci50[1] < ci95[1]

    def test_matches_naive_stratified_bootstrap(self) -> None:
        rng = np.random.default_rng(12)
        y, s = _separable(rng, 300, 1.0)
        pos, neg = s[y == 1], s[y == 0]
        aucs = []
        for _ in range(1000):
            rp = rng.choice(pos, pos.size)
            rn = rng.choice(neg, neg.size)
            aucs.append(_brute_auc(np.r_[np.ones(rp.size), np.zeros(rn.size)], np.r_[rp, rn]))
        naive = np.quantile(aucs, [0.025, 0.975])
        fast = m.bootstrap_auc_ci(y, s, n=1000)
        np.testing.assert_allclose(fast, naive, atol=0.015)

    def test_one_class_gives_nan(self) -> None:
        lo, hi = m.bootstrap_auc_ci([1, 1, 1], [0.1, 0.5, 0.9])
        assert math.isnan(lo) and math.isnan(hi)


class TestHistograms:
    def test_counts_and_edges(self) -> None:
        h = m.score_histograms([1, 0, 0, 1, 1], [0.0, 0.05, 0.5, 0.999, 1.0], bins=10)
        assert h["pos"] == [1, 0, 0, 0, 0, 0, 0, 0, 0, 2]
        assert h["neg"] == [1, 0, 0, 0, 0, 1, 0, 0, 0, 0]
        json.dumps(h)  # plain ints, ready for a MetricRecord/JSON

    def test_auc_close_to_exact(self) -> None:
        for seed in range(5):
            y, s = _separable(np.random.default_rng(100 + seed), 3000, 1.2)
            hist_auc = m.pooled_auc_from_histograms([m.score_histograms(y, s, bins=200)])
            assert abs(hist_auc - m.roc_auc(y, s)) < 0.005

    def test_exact_when_scores_sit_in_distinct_bins(self) -> None:
        rng = np.random.default_rng(13)
        s = (rng.permutation(200)[:120] + 0.5) / 200  # bin centres, all different bins
        y = rng.integers(0, 2, s.size)
        hist_auc = m.pooled_auc_from_histograms([m.score_histograms(y, s, bins=200)])
        assert hist_auc == pytest.approx(m.roc_auc(y, s), abs=1e-12)

    def test_pooling_two_sites_equals_pooled_scores(self) -> None:
        rng = np.random.default_rng(14)
        ya, sa = _separable(rng, 700, 2.0)
        yb, sb = _separable(rng, 300, 0.3)  # a different site: non-IID
        site_a, site_b = m.score_histograms(ya, sa), m.score_histograms(yb, sb)
        pooled = m.score_histograms(np.r_[ya, yb], np.r_[sa, sb])
        summed = {k: list(np.add(site_a[k], site_b[k])) for k in ("pos", "neg")}
        assert summed == pooled
        assert m.pooled_auc_from_histograms([site_a, site_b]) == m.pooled_auc_from_histograms([pooled])
        # and the pooled AUC is not just the mean of the two site AUCs
        mean_auc = (m.pooled_auc_from_histograms([site_a]) + m.pooled_auc_from_histograms([site_b])) / 2
        assert abs(m.pooled_auc_from_histograms([pooled]) - mean_auc) > 1e-3

    def test_pooled_roc(self) -> None:
        y, s = _separable(np.random.default_rng(15), 1000, 1.0)
        hist = m.score_histograms(y, s, bins=50)
        fpr, tpr = m.pooled_roc_from_histograms([hist])
        assert fpr.shape == tpr.shape == (51,)
        assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
        assert (np.diff(fpr) >= 0).all() and (np.diff(tpr) >= 0).all()
        assert _trapezoid(fpr, tpr) == pytest.approx(m.pooled_auc_from_histograms([hist]), abs=1e-12)
        # point i is "predict positive in the top i bins": threshold 1 - i/50
        sens, spec = m.sens_spec(y, s, 1 - 10 / 50)
        assert (tpr[10], fpr[10]) == (pytest.approx(sens), pytest.approx(1 - spec))

    def test_mismatched_bins_rejected(self) -> None:
        a = m.score_histograms([0, 1], [0.2, 0.8], bins=10)
        b = m.score_histograms([0, 1], [0.2, 0.8], bins=20)
        with pytest.raises(m.MetricsError, match="different bin counts"):
            m.pooled_auc_from_histograms([a, b])
        with pytest.raises(m.MetricsError, match="no histograms"):
            m.pooled_auc_from_histograms([])

    def test_one_class_is_nan(self) -> None:
        assert math.isnan(m.pooled_auc_from_histograms([m.score_histograms([1, 1], [0.2, 0.8])]))

    def test_rejects_out_of_range(self) -> None:
        with pytest.raises(m.MetricsError, match=r"\[0,1\]"):
            m.score_histograms([0, 1], [0.2, 1.2])


class TestWeightedMean:
    def test_ignores_nan_with_its_weight(self) -> None:
        assert m.weighted_mean([0.8, float("nan"), 0.6], [10, 5, 30]) == pytest.approx(0.65)

    def test_nothing_left_is_nan(self) -> None:
        assert math.isnan(m.weighted_mean([float("nan")], [3]))
        assert math.isnan(m.weighted_mean([0.5], [0]))

    def test_rejects_bad_weights(self) -> None:
        with pytest.raises(m.MetricsError):
            m.weighted_mean([0.5, 0.6], [1, -1])
        with pytest.raises(m.MetricsError):
            m.weighted_mean([0.5, 0.6], [1])


class TestMacroAuc:
    def test_indices_and_onehot_agree(self) -> None:
        rng = np.random.default_rng(16)
        idx = rng.integers(0, 3, 300)
        probs = rng.dirichlet([1, 1, 1], 300) + np.eye(3)[idx] * 0.5
        probs /= probs.sum(1, keepdims=True)
        expected = np.mean([m.roc_auc(idx == c, probs[:, c]) for c in range(3)])
        assert m.macro_auc(idx, probs) == pytest.approx(expected)
        assert m.macro_auc(np.eye(3)[idx], probs) == pytest.approx(expected)

    def test_skips_class_without_both_labels(self) -> None:
        y = np.array([[1, 0], [0, 0], [1, 0]])  # finding 2 never present
        p = np.array([[0.9, 0.1], [0.2, 0.7], [0.6, 0.3]])
        assert m.macro_auc(y, p) == pytest.approx(1.0)
        assert math.isnan(m.macro_auc(np.zeros((2, 2)), p[:2]))

    def test_rejects_bad_indices(self) -> None:
        with pytest.raises(m.MetricsError, match="class indices"):
            m.macro_auc([0, 3], np.full((2, 3), 1 / 3))


class TestBinaryReport:
    def test_fields_agree_with_single_metrics(self) -> None:
        y, s = _separable(np.random.default_rng(17), 500, 1.5)
        r = m.binary_report(y, s, 0.4, bootstrap=200, seed=1)
        assert r.auc == m.roc_auc(y, s)
        assert r.auc_ci == m.bootstrap_auc_ci(y, s, n=200, seed=1)
        assert (r.sensitivity, r.specificity) == m.sens_spec(y, s, 0.4)
        assert r.confusion == m.confusion(y, s, 0.4)
        assert (r.n, r.n_pos, r.threshold) == (500, int(y.sum()), 0.4)
        assert r.ece == m.expected_calibration_error(y, s)
        assert json.loads(json.dumps(r.to_dict()))["auc_ci"] == list(r.auc_ci)

    def test_bootstrap_zero_skips_ci(self) -> None:
        r = m.binary_report([0, 1, 1], [0.2, 0.6, 0.9], 0.5, bootstrap=0)
        assert all(math.isnan(v) for v in r.auc_ci) and r.auc == 1.0


class TestEvaluationHistograms:
    def test_threshold_is_the_youden_edge(self):
        neg, pos = [0] * 10, [0] * 10
        neg[2], pos[7] = 50, 50
        t = m.histogram_threshold([{"pos": pos, "neg": neg}])
        assert 0.2 < t <= 0.7
        assert m.histogram_rates([{"pos": pos, "neg": neg}], t, np.linspace(0, 1, 11)) == (1.0, 1.0)

    def test_noise_in_an_empty_extreme_bin_does_not_move_the_threshold(self):
        """A rare finding: 20 positives, and DP noise of -15 in the lowest (empty) positive bin."""
        neg, pos = [0.0] * 10, [0.0] * 10
        neg[3], pos[6] = 200.0, 20.0
        pos[0] = -15.0  # unclipped, sensitivity at the first edge would be 35/20 > 1
        assert 0.3 < m.histogram_threshold([{"pos": pos, "neg": neg}]) <= 0.6

    def test_logit_edges_resolve_confident_scores(self):
        y = np.r_[np.zeros(200), np.ones(200)]
        s = np.r_[np.full(200, 0.9955), np.full(200, 0.9985)]  # both in the last of 200 equal-width bins
        assert m.pooled_auc_from_histograms([m.score_histograms(y, s, bins=200)]) == 0.5
        assert m.pooled_auc_from_histograms([m.score_histograms(y, s, edges=m.EVAL_EDGES)]) == 1.0

    def test_noise_is_added_and_pooling_clips_negative_counts(self):
        rng = np.random.default_rng(0)
        hist = m.score_histograms([0, 1, 1], [0.1, 0.8, 0.9], edges=m.EVAL_EDGES)
        noised = m.noised_histograms(hist, 10.0, rng)
        assert noised["pos"] != hist["pos"] and len(noised["pos"]) == len(m.EVAL_EDGES) - 1
        assert any(v < 0 for v in noised["neg"])
        fpr, tpr = m.pooled_roc_from_histograms([noised])  # the ROC clips each count: rates stay monotone in [0, 1]
        assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0) and fpr[-1] == tpr[-1] == 1.0
        auc = m.pooled_auc_from_histograms([noised])
        assert 0.0 <= auc <= 1.0  # 3 images under noise 10: a signed class total may be <= 0, the clipped one is not

    def test_pooled_auc_of_noised_histograms_is_nearly_unbiased(self):
        """Three sites, 600 validation images, eval-noise 10: the estimate centres on the exact AUC."""
        rng = np.random.default_rng(0)
        exact, pooled, clipped = [], [], []
        for _ in range(60):
            y = np.r_[np.ones(300), np.zeros(300)]
            s = 1 / (1 + np.exp(-np.r_[rng.normal(2.4, 1.5, 300), rng.normal(-2.4, 2.5, 300)]))
            noised = [m.noised_histograms(m.score_histograms(y[i], s[i], edges=m.EVAL_EDGES), 10.0, rng)
                      for i in np.array_split(rng.permutation(600), 3)]
            exact.append(m.roc_auc(y, s))
            pooled.append(m.pooled_auc_from_histograms(noised))
            pos, neg = (np.clip(np.sum([h[k] for h in noised], axis=0), 0, None) for k in ("pos", "neg"))
            clipped.append(float(m._auc_from_counts(pos, neg)))
        assert abs(np.mean(pooled) - np.mean(exact)) < 0.04 < 0.1 < np.mean(exact) - np.mean(clipped)

    def test_histogram_loss_is_small_for_confident_correct_scores(self):
        y = np.r_[np.zeros(50), np.ones(50)]
        good = m.score_histograms(y, np.r_[np.full(50, 0.01), np.full(50, 0.99)], edges=m.EVAL_EDGES)
        bad = m.score_histograms(y, np.r_[np.full(50, 0.99), np.full(50, 0.01)], edges=m.EVAL_EDGES)
        assert m.histogram_loss([good], m.EVAL_EDGES) < 0.05 < 3.0 < m.histogram_loss([bad], m.EVAL_EDGES)
