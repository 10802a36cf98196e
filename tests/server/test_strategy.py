"""Update validation, threshold choice and strategy construction (no Flower run needed)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from float32_tolerance import sum_tolerance

from common.config import RunConfig
from server.strategy import make_strategy
from server.update_checks import check_update, clip_update, server_plan, update_norm_bound


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


@pytest.mark.parametrize("name", ["fedavg", "fedprox", "fedadam", "trimmed-mean", "median"])
def test_make_strategy(name):
    run = RunConfig(strategy=name, min_sites=3, proximal_mu=0.25, server_learning_rate=0.05, trim_beta=0.1)
    s = make_strategy(run, round_offset=2)
    assert s.round_offset == 2 and s.min_available_nodes == 3
    if name == "fedprox":
        assert s.proximal_mu == 0.25
    elif name == "fedadam":
        assert s.eta == 0.05 and s.eta_l == run.learning_rate
    elif name == "trimmed-mean":
        assert s.beta == 0.1


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch):
    """Messages made outside a Flower process need a task identity (as the SuperLink would set)."""
    from flwr.supercore.task_identity import TaskIdentity

    for name in ("_run_id", "_node_id", "_task_id"):
        if hasattr(TaskIdentity, name):
            monkeypatch.setattr(TaskIdentity, name, 1)


def _reply(site: str, weights: dict, n: int, node: int | None = None, **metrics):
    from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

    content = RecordDict({
        "arrays": ArrayRecord({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in weights.items()}),
        "metrics": MetricRecord({"num-examples": n, "train-loss": 0.5, "steps": 2, "noise-multiplier": 1.0,
                                 "epsilon-total": 1.0, **metrics}),
        "site": ConfigRecord({"site-name": site}),
    })
    msg = Message(content=content, dst_node_id=0, message_type="train")
    # As the SuperLink sets it: the node the reply came from (each site its own unless a test says otherwise).
    object.__setattr__(msg.metadata, "_src_node_id", node if node is not None else 1000 + sum(map(ord, site)))
    return msg


@pytest.mark.parametrize("strategy", ["fedavg", "trimmed-mean"])
def test_bad_update_rejected_others_aggregated(ref, strategy):
    from flwr.app import ArrayRecord

    run = RunConfig(strategy=strategy, min_sites=2, max_site_examples=1000)
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
        # A float32 weighted mean of two replies (two products, a sum, a division) of weights of size |ref|.
        tol = sum_tolerance(4, np.abs(ref["a.weight"]).max() + 0.003)
        assert np.allclose(out, ref["a.weight"] + (0.001 * 10 + 0.003 * 30) / 40, rtol=0, atol=tol)


def test_all_updates_bad_keeps_model(ref):
    s = make_strategy(RunConfig())
    s._global = {k: v.copy() for k, v in ref.items()}
    bad = {k: v + np.inf for k, v in ref.items()}
    assert s.aggregate_train(1, [_reply("h1", bad, 5)]) == (None, None)


def test_a_site_is_its_node_not_the_name_it_reports(ref):
    s = make_strategy(RunConfig(min_sites=2))
    s._global = {k: v.copy() for k, v in ref.items()}
    small = {k: v + 1e-3 for k, v in ref.items()}
    s.aggregate_train(1, [_reply("h1", small, 10, node=1), _reply("h2", small, 10, node=2)])
    # Node 2 now claims to be h1 (to overwrite h1's epsilon in the model card): rejected, h1's figures intact.
    s.aggregate_train(2, [_reply("h1", small, 10, node=1, **{"epsilon-total": 2.0}),
                          _reply("h1", small, 10, node=2, **{"epsilon-total": 99.0})])
    assert s.logs[2].train["h1"]["epsilon-total"] == 2.0
    assert "node 2 joined as 'h2'" in s.logs[2].rejected["h2"]


def test_a_site_cannot_grow_its_weight_mid_run(ref):
    s = make_strategy(RunConfig(min_sites=2, max_site_examples=1_000_000))
    s._global = {k: v.copy() for k, v in ref.items()}
    a = {k: v + 0.001 for k, v in ref.items()}
    b = {k: v + 0.003 for k, v in ref.items()}
    s.aggregate_train(1, [_reply("h1", a, 10), _reply("h2", b, 10)])
    arrays, _ = s.aggregate_train(2, [_reply("h1", a, 10), _reply("h2", b, 10_000)])
    out = arrays["a.weight"].numpy()
    tol = sum_tolerance(4, np.abs(ref["a.weight"]).max() + 0.003)  # a float32 weighted mean of two replies
    assert np.allclose(out, ref["a.weight"] + 0.002, rtol=0, atol=tol)  # still weighted 10:10


def test_a_site_claiming_a_million_images_from_round_one_is_bounded(ref):
    a = {k: v + 0.001 for k, v in ref.items()}
    b = {k: v + 0.003 for k, v in ref.items()}
    equal = make_strategy(RunConfig(min_sites=2))  # no cap in the run config: every site weighs the same
    equal._global = {k: v.copy() for k, v in ref.items()}
    arrays, _ = equal.aggregate_train(1, [_reply("h1", a, 100), _reply("liar", b, 1_000_000)])
    assert np.allclose(arrays["a.weight"].numpy(), ref["a.weight"] + 0.002, atol=1e-6)
    capped = make_strategy(RunConfig(min_sites=2, max_site_examples=300))  # the coordinator's own bound
    capped._global = {k: v.copy() for k, v in ref.items()}
    arrays, _ = capped.aggregate_train(1, [_reply("h1", a, 100), _reply("liar", b, 1_000_000)])
    assert np.allclose(arrays["a.weight"].numpy(), ref["a.weight"] + (0.001 * 100 + 0.003 * 300) / 400, atol=1e-6)
    assert capped.logs[1].train["liar"]["num-examples"] == 300


def test_norm_bound_comes_from_the_coordinators_plan_not_the_reply(ref):
    run = RunConfig(min_sites=1, sample_rate=0.2, local_epochs=1, num_server_rounds=2, target_epsilon=3.0)
    plan = server_plan(run)
    assert plan.steps == 5 and plan.noise_multiplier is not None and plan.noise_multiplier > 0.5
    s = make_strategy(run)
    s._global = {k: v.copy() for k, v in ref.items()}
    n_params = sum(v.size for v in ref.values())
    bound = update_norm_bound(run, plan.steps, n_params, plan.noise_multiplier, batch=0.2 * 100)
    huge = {k: v + 2 * bound for k, v in ref.items()}
    # The reply claims a million steps and enormous noise to widen the bound: the plan decides.
    s.aggregate_train(1, [_reply("h1", huge, 100, steps=1e6, **{"noise-multiplier": 1e6})])
    assert "norm" in s.logs[1].rejected["h1"]


def test_server_clip_bounds_each_update(ref):
    big = {k: v + 10.0 for k, v in ref.items()}
    clipped, norm = clip_update(big, ref, 1.0)
    assert norm > 10.0
    delta = np.sqrt(sum(float(np.sum((clipped[k] - ref[k]) ** 2)) for k in ref))
    assert delta == pytest.approx(1.0, rel=1e-5)
    s = make_strategy(RunConfig(min_sites=1, server_clip=1.0, dp=False))
    s._global = {k: v.copy() for k, v in ref.items()}
    arrays, _ = s.aggregate_train(1, [_reply("h1", {k: v + 0.01 for k, v in ref.items()}, 10)])
    assert np.allclose(arrays["b.bias"].numpy(), ref["b.bias"] + 0.01)  # small updates pass unchanged


def test_multilabel_class_metrics_name_the_threshold_rule():
    """A rare finding whose Youden threshold sits at the lowest bin gets the prevalence rule; metrics.json names it."""
    from common.pooled_metrics import THRESHOLD_RULES
    from server.rounds import per_label
    from server.strategy import class_metrics

    weak = {"pos": [0, 0, 1, 1, 1, 2, 2, 2, 2, 2, 1, 1, 1, 0, 0, 0],
            "neg": [9, 8, 4, 8, 12, 20, 28, 36, 40, 30, 25, 15, 10, 5, 0, 0]}
    out = class_metrics("0", [weak], multilabel=True)
    assert THRESHOLD_RULES[int(out["threshold-rule-0"])] == "prevalence"
    assert out["threshold-0"] > 0.5 and out["specificity-0"] > 0.9
    figures = per_label(out, ("Infiltration",))["Infiltration"]
    assert figures["threshold_rule"] == "prevalence" and figures["threshold"] == out["threshold-0"]
    assert "threshold-rule-0" not in class_metrics("0", [weak], multilabel=False)
