"""Update validation, threshold choice and strategy construction (no Flower run needed)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

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


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch):
    """Messages made outside a Flower process need a task identity (as the SuperLink would set)."""
    from flwr.supercore.task_identity import TaskIdentity

    for name in ("_run_id", "_node_id", "_task_id"):
        if hasattr(TaskIdentity, name):
            monkeypatch.setattr(TaskIdentity, name, 1)


def _reply(site: str, weights: dict, n: int):
    from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

    content = RecordDict({
        "arrays": ArrayRecord({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in weights.items()}),
        "metrics": MetricRecord({"num-examples": n, "train-loss": 0.5, "steps": 2, "noise-multiplier": 1.0,
                                 "epsilon-total": 1.0}),
        "site": ConfigRecord({"site-name": site}),
    })
    return Message(content=content, dst_node_id=0, message_type="train")


@pytest.mark.parametrize("strategy", ["fedavg", "trimmed-mean"])
def test_bad_update_rejected_others_aggregated(ref, strategy):
    from flwr.app import ArrayRecord

    run = RunConfig(strategy=strategy, min_sites=2)
    s = make_strategy(run)
    s._global = {k: v.copy() for k, v in ref.items()}
    good1 = {k: v + 0.001 for k, v in ref.items()}
    good2 = {k: v + 0.003 for k, v in ref.items()}
    bad = {k: v.copy() for k, v in ref.items()}
    bad["a.weight"][0, 0] = np.nan
    wrong = {"a.weight": np.zeros((3, 4), np.float32), "b.bias": ref["b.bias"]}
    replies = [_reply("h1", good1, 10), _reply("h2", good2, 30), _reply("h3", bad, 10), _reply("h4", wrong, 10)]
    arrays, _ = s.aggregate_train(1, replies)
    assert isinstance(arrays, ArrayRecord)
    assert set(s.logs[1].rejected) == {"h3", "h4"} and set(s.logs[1].train) == {"h1", "h2"}
    out = arrays["a.weight"].numpy()
    assert np.all(np.isfinite(out))
    if strategy == "fedavg":
        assert np.allclose(out, ref["a.weight"] + (0.001 * 10 + 0.003 * 30) / 40, atol=1e-6)


def test_all_updates_bad_keeps_model(ref):
    s = make_strategy(RunConfig())
    s._global = {k: v.copy() for k, v in ref.items()}
    bad = {k: v + np.inf for k, v in ref.items()}
    assert s.aggregate_train(1, [_reply("h1", bad, 5)]) == (None, None)
