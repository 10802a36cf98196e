"""common/operating_point.py: the threshold rules, on exact scores and on binned counts (issue 20)."""

from __future__ import annotations

import numpy as np
import pytest

from common.metrics import sens_spec
from common.operating_point import (
    OperatingPoint,
    bin_position,
    parse_operating_point,
    position_from_counts,
    rates_at,
    threshold_at,
    threshold_from_counts,
    threshold_from_scores,
)
from common.pooled_metrics import BINARY_EDGES, score_histograms


class TestParse:
    @pytest.mark.parametrize(("text", "rule", "target"), [("youden", "youden", None), (" Sensitivity:0.95 ", "sensitivity", 0.95),
                                                         ("specificity:0.9", "specificity", 0.9)])
    def test_the_three_forms(self, text, rule, target):
        point = parse_operating_point(text)
        assert (point.rule, point.target) == (rule, target) and parse_operating_point(str(point)) == point

    @pytest.mark.parametrize("bad", ["", "sensitivity", "sensitivity:95", "specificity:0", "recall:0.9", "youden:0.5", "sensitivity:x"])
    def test_anything_else_is_one_error_naming_the_forms(self, bad):
        with pytest.raises(ValueError, match="youden, sensitivity:X or specificity:X"):
            parse_operating_point(bad)


def _scores(seed: int = 0, n: int = 400):
    rng = np.random.default_rng(seed)
    y = rng.random(n) < 0.4
    return y, 1.0 / (1.0 + np.exp(-(rng.normal(0, 1.5, n) + 2.5 * y)))


class TestExactScores:
    def test_youden_maximises_sensitivity_plus_specificity(self):
        y, s = _scores()
        t = threshold_from_scores(y, s, OperatingPoint())
        best = max(sum(sens_spec(y, s, c)) for c in np.unique(s))
        assert sum(sens_spec(y, s, t)) == pytest.approx(best)

    def test_sensitivity_rule_is_the_highest_threshold_reaching_the_target(self):
        y, s = _scores()
        t = threshold_from_scores(y, s, OperatingPoint("sensitivity", 0.9))
        assert sens_spec(y, s, t)[0] >= 0.9
        assert sens_spec(y, s, np.min(s[s > t]))[0] < 0.9  # the next threshold up misses the target

    def test_specificity_rule_is_the_lowest_threshold_reaching_the_target(self):
        y, s = _scores()
        t = threshold_from_scores(y, s, OperatingPoint("specificity", 0.8))
        assert sens_spec(y, s, t)[1] >= 0.8
        assert sens_spec(y, s, np.max(s[s < t]))[1] < 0.8


class TestCounts:
    def test_positions_and_thresholds_are_inverse_and_rates_interpolate_inside_a_bin(self):
        for t in (BINARY_EDGES[2], 0.3, 0.5, 0.97):
            assert threshold_at(bin_position(t, BINARY_EDGES), BINARY_EDGES) == pytest.approx(t)
        pos, neg = np.array([0, 0, 1, 2, 5, 10, 30, 50.0]), np.array([40, 30, 20, 8, 2, 0, 0, 0.0])
        (s4, p4), (s5, p5) = (rates_at(pos, neg, x) for x in (4.0, 5.0))
        s45, p45 = rates_at(pos, neg, 4.5)
        assert s45 == pytest.approx((s4 + s5) / 2) and p45 == pytest.approx((p4 + p5) / 2)

    def test_rules_on_exact_counts_land_where_the_scores_put_them(self):
        y, s = _scores(1, 4000)
        h = score_histograms(y, s, edges=BINARY_EDGES)
        t = threshold_from_counts(h["pos"], h["neg"], BINARY_EDGES, OperatingPoint("sensitivity", 0.9))
        edge = max(e for e in BINARY_EDGES[1:-1] if sens_spec(y, s, e)[0] >= 0.9)  # the best a bin edge can do
        got = sens_spec(y, s, t)[0]
        assert got == pytest.approx(0.9, abs=0.04) and abs(got - 0.9) < abs(sens_spec(y, s, edge)[0] - 0.9)
        youden = threshold_from_counts(h["pos"], h["neg"], BINARY_EDGES, OperatingPoint())
        exact = threshold_from_scores(y, s, OperatingPoint())
        best_edge = max(BINARY_EDGES[1:-1], key=lambda e: sum(sens_spec(y, s, e)))
        z = [float(np.log(t / (1 - t))) for t in (youden, exact, best_edge)]
        assert abs(z[0] - z[1]) < abs(z[2] - z[1])  # between the edges, nearer the scores' own Youden point
        x = position_from_counts(h["pos"], h["neg"], OperatingPoint())
        assert abs(x - bin_position(best_edge, BINARY_EDGES)) <= 0.5
        x = position_from_counts(h["pos"], h["neg"], OperatingPoint("specificity", 0.95))
        assert rates_at(h["pos"], h["neg"], x)[1] >= 0.95 - 1e-9

    def test_a_missing_class_gives_the_neutral_threshold(self):
        assert threshold_from_counts([0] * 8, [5] * 8, BINARY_EDGES, OperatingPoint()) == 0.5
