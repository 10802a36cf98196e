"""common/calibration.py: Platt scaling from pooled histograms undoes an overconfident head."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.calibration import Calibrated, CalibrationError, calibrated_threshold, fit_platt
from common.metrics import BINARY_EDGES, EVAL_EDGES, score_histograms


def test_recovers_the_temperature_of_an_overconfident_model():
    rng = np.random.default_rng(0)
    z_true = rng.normal(0, 2.5, 20_000)
    y = rng.random(z_true.size) < 1 / (1 + np.exp(-z_true))  # labels drawn from calibrated probabilities
    z_model = 4.0 * z_true  # the model is four times too confident
    hist = score_histograms(y, 1 / (1 + np.exp(-np.clip(z_model, -30, 30))), edges=EVAL_EDGES)
    a, b = fit_platt(hist["pos"], hist["neg"], EVAL_EDGES)
    assert a == pytest.approx(0.25, rel=0.15) and abs(b) < 0.15


def test_calibrated_model_keeps_the_ranking_and_unsaturates_probabilities():
    net = torch.nn.Linear(3, 1)
    with torch.no_grad():
        net.weight.fill_(20.0)
    x = torch.tensor([[1.0, 1.0, 1.0], [0.5, 0.5, 0.6], [-1.0, -1.0, -1.0]])
    raw = torch.sigmoid(net(x))[:, 0]
    cal = torch.sigmoid(Calibrated(net, 0.05, 0.1)(x))[:, 0]
    assert raw[0] == 1.0 and raw[1] == 1.0  # float32 saturation: the two cannot be told apart
    assert cal[0] > cal[1] > cal[2] and cal[0] < 1.0


def test_threshold_moves_with_the_map_and_one_class_is_refused():
    assert calibrated_threshold(0.5, 0.2, 0.0) == pytest.approx(0.5)
    assert calibrated_threshold(0.99, 0.2, 0.0) < 0.99
    with pytest.raises(CalibrationError):
        fit_platt([0] * 16, [5] * 16, EVAL_EDGES)


def test_an_underconfident_model_is_sharpened_not_pinned_at_a_search_bound():
    """Issue 20: the old grid kept a in [0.01, 1] and b in [-8, 8]; a model 3 times too timid needs a = 3."""
    rng = np.random.default_rng(1)
    z_true = rng.normal(0, 3.0, 20_000)
    y = rng.random(z_true.size) < 1 / (1 + np.exp(-z_true))
    edges = np.concatenate([[0.0], 1 / (1 + np.exp(-np.linspace(-5, 5, 101))), [1.0]])  # bins fine enough for its spread
    hist = score_histograms(y, 1 / (1 + np.exp(-z_true / 3.0)), edges=edges)
    a, b = fit_platt(hist["pos"], hist["neg"], edges)
    assert a == pytest.approx(3.0, rel=0.1) and abs(b) < 0.2


def test_separated_noised_bins_still_give_one_finite_fit():
    pos, neg = [0, 0, 0, 0, 0, 3, 40, 90], [80, 30, 5, 0, 0, 0, 0, 0]  # no bin holds both classes
    a, b = fit_platt(pos, neg, BINARY_EDGES)
    assert 0 < a < 10 and abs(b) < 10
    with pytest.raises(CalibrationError, match="rank"):
        fit_platt(neg, pos, BINARY_EDGES)  # positives below negatives: no increasing map
