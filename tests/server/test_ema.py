"""server/ema.py: the coordinator's running average of the global weights, evaluated, checkpointed, resumed, exported."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.config import RunConfig
from common.metrics import EVAL_EDGES, score_histograms
from server.checkpoint import latest_checkpoint, load_best
from server.ema import WeightAverage, exported_weights
from server.rounds import RoundKeeper
from server.strategy import RoundLog, load_strategy_state, make_strategy, strategy_state


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch):
    """Messages made outside a Flower process need a task identity (as the SuperLink would set)."""
    from flwr.supercore.task_identity import TaskIdentity

    for name in ("_run_id", "_node_id", "_task_id"):
        if hasattr(TaskIdentity, name):
            monkeypatch.setattr(TaskIdentity, name, 1)


def _reply(site: str, weights: dict, n: int):
    """A site's training reply as the SuperLink hands it to the strategy (as in tests/server/test_strategy.py)."""
    from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

    content = RecordDict({
        "arrays": ArrayRecord({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in weights.items()}),
        "metrics": MetricRecord({"num-examples": n, "steps": 2, "noise-multiplier": 1.0, "epsilon-total": 1.0}),
        "site": ConfigRecord({"site-name": site}),
    })
    msg = Message(content=content, dst_node_id=0, message_type="train")
    object.__setattr__(msg.metadata, "_src_node_id", 1000 + sum(map(ord, site)))
    return msg


def _log_round(strategy, r: int) -> None:
    """Two sites' evaluation histograms for round r (as in tests/server/test_rounds.py)."""
    rng = np.random.default_rng(r)
    y = np.r_[np.zeros(50), np.ones(50)]
    h = score_histograms(y, np.clip(0.5 + 0.6 * (y - 0.5) + rng.normal(0, 0.1, 100), 0, 1), edges=EVAL_EDGES)
    entry = strategy.logs.setdefault(r, RoundLog())
    entry.evaluate.update({s: {"num-examples": 100.0, "hist-pos": h["pos"], "hist-neg": h["neg"]} for s in ("h1", "h2")})


class TestWeightAverage:
    def test_first_round_is_taken_as_it_is_then_decays(self) -> None:
        avg = WeightAverage(0.5)
        assert avg.active and not WeightAverage(0.0).active
        avg.update({"w": np.full(2, 4.0, np.float32), "n": np.array([7])})
        out = avg.update({"w": np.full(2, 2.0, np.float32), "n": np.array([8])})
        np.testing.assert_array_equal(out["w"], [3.0, 3.0])
        out = avg.update({"w": np.zeros(2, np.float32), "n": np.array([9])})
        np.testing.assert_array_equal(out["w"], [1.5, 1.5])
        assert out["w"].dtype == np.float32 and out["n"].tolist() == [9]  # integer tensors are not averaged
        again = WeightAverage(0.5, avg.state())
        assert again.rounds == 3
        np.testing.assert_array_equal(again.update({"w": np.zeros(2, np.float32), "n": np.array([1])})["w"], [0.75, 0.75])

    def test_decay_outside_zero_to_one_is_refused(self) -> None:
        for bad in (-0.1, 1.0):
            with pytest.raises(ValueError, match="decay"):
                WeightAverage(bad)
        problems = RunConfig.from_mapping
        with pytest.raises(ValueError, match="weight-average"):
            problems({"weight-average": 1.5})

    def test_exported_weights_are_the_average_when_there_is_one(self) -> None:
        w = {"w": np.ones(2, np.float32)}
        assert exported_weights({}, w) is w
        state = {"weight_average": {"rounds": 2, "weights": {"w": np.zeros(2, np.float32)}}}
        np.testing.assert_array_equal(exported_weights(state, w)["w"], [0.0, 0.0])


class _Nodes:
    """Stands in for Flower's Grid where only the connected node ids are asked for."""

    def get_node_ids(self) -> list[int]:
        return [1, 2]


def _weights(v: float) -> dict[str, np.ndarray]:
    return {"a.weight": np.full((4, 3), v, np.float32), "b.bias": np.full(3, v, np.float32)}


def test_the_strategy_averages_what_it_aggregates_and_sites_evaluate_the_average(tmp_path):
    from flwr.app import ArrayRecord, ConfigRecord

    s = make_strategy(RunConfig(weight_average=0.5, min_sites=2))
    keeper = RoundKeeper(strategy=s, run_dir=tmp_path, run_name="r", config_map={"model": "scatternet"},
                         history=[], start_round=0, total_rounds=3, patience=0)
    s._global = _weights(0.0)
    for r, v in ((1, 0.01), (2, 0.03)):
        arrays, _ = s.aggregate_train(r, [_reply("h1", _weights(v), 10), _reply("h2", _weights(v), 10)])
        np.testing.assert_allclose(arrays["a.weight"].numpy(), v)  # training goes on from the round's own model
        s._global = {k: t.numpy() for k, t in arrays.items()}
        _log_round(s, r)
        keeper.after_round(r, s._global)
    np.testing.assert_allclose(s.average.weights["a.weight"], 0.02)  # 0.5 * 0.01 + 0.5 * 0.03
    messages = list(s.configure_evaluate(2, ArrayRecord({k: torch.from_numpy(v) for k, v in s._global.items()}),
                                         ConfigRecord({}), _Nodes()))
    assert messages and all(np.allclose(next(iter(m.content.array_records.values()))["a.weight"].numpy(), 0.02)
                            for m in messages)
    ckpt = latest_checkpoint(tmp_path)
    np.testing.assert_allclose(ckpt.weights["a.weight"], 0.03)  # resume trains from the round's own model
    np.testing.assert_allclose(exported_weights(ckpt.strategy_state, ckpt.weights)["a.weight"], 0.02)
    np.testing.assert_allclose(load_best(tmp_path)[1]["a.weight"], 0.01)  # best round 1: the average then

    resumed = make_strategy(RunConfig(weight_average=0.5, min_sites=2), round_offset=2)
    load_strategy_state(resumed, ckpt.strategy_state)
    resumed._global = ckpt.weights
    resumed.aggregate_train(1, [_reply("h1", _weights(0.05), 10), _reply("h2", _weights(0.05), 10)])
    assert resumed.average.rounds == 3
    np.testing.assert_allclose(resumed.average.weights["a.weight"], 0.035)  # the same average, continued
    assert "weight_average" not in strategy_state(make_strategy(RunConfig()))  # off: nothing kept
