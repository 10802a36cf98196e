"""Update validation, threshold choice and strategy construction (no Flower run needed)."""

from __future__ import annotations

import numpy as np
import pytest

from common.config import RunConfig
from server.strategy import _youden_threshold, check_update, make_strategy, update_norm_bound


@pytest.fixture
def ref():
    rng = np.random.default_rng(0)
    return {"a.weight": rng.normal(size=(4, 3)).astype(np.float32), "b.bias": np.zeros(3, np.float32)}


class TestCheckUpdate:
    def test_accepts_small_update(self, ref):
        upd = {k: v + 1e-3 for k, v in ref.items()}
        assert check_update(upd, ref, bound=1.0) is None

    def test_rejects_nan(self, ref):
        upd = {k: v.copy() for k, v in ref.items()}
        upd["b.bias"][1] = np.nan
        assert "NaN" in check_update(upd, ref, bound=None)

    def test_rejects_wrong_shape_and_keys(self, ref):
        assert "shape" in check_update({"a.weight": np.zeros((3, 4), np.float32), "b.bias": ref["b.bias"]}, ref, bound=None)
        assert "keys differ" in check_update({"a.weight": ref["a.weight"]}, ref, bound=None)

    def test_rejects_norm_beyond_bound(self, ref):
        upd = {k: v + 100.0 for k, v in ref.items()}
        assert "norm" in check_update(upd, ref, bound=1.0)

    def test_bound_grows_with_steps(self):
        run = RunConfig()
        assert update_norm_bound(run, 10, 1000, 1.0) > update_norm_bound(run, 1, 1000, 1.0) > 0


def test_youden_threshold_separates_classes():
    neg = [0] * 10
    pos = [0] * 10
    neg[2] = 50
    pos[7] = 50
    t = _youden_threshold([{"pos": pos, "neg": neg}], None, None)
    assert 0.2 < t <= 0.7


@pytest.mark.parametrize("name", ["fedavg", "fedprox", "fedadam", "trimmed-mean", "median"])
def test_make_strategy(name):
    s = make_strategy(RunConfig(strategy=name, min_sites=3), round_offset=2)
    assert s.round_offset == 2 and s.min_available_nodes == 3
