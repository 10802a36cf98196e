"""The coordinator's part of the intended-use gate (server/gate.py): what it asks, what it pools, what it exports."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from common.models import build_model
from common.ood import GateReference, OodScore, noised_histogram
from server.gate import evaluate_config, export_gate, pooled_reference, reference_from_history
from server.strategy import load_strategy_state, strategy_state


def _sums(seed: int, n: int = 150, values: int = 48) -> dict:
    """A site's exact sums of ``values``-long unit vectors (48: a ScatterNet's descriptor, 32: a CNN's)."""
    rng = np.random.default_rng(seed)
    u = rng.normal(1.0, 0.2, size=(n, values))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    return {"gate-sum": u.sum(0).tolist(), "gate-n": float(n)}


def _hist(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {"gate-hist": noised_histogram(np.exp(rng.normal(0, 0.4, 200)), 7.07, rng), "gate-noise": 7.07}


def test_the_coordinator_asks_for_sums_until_it_holds_a_reference_then_sends_it():
    assert evaluate_config("") == {"gate-stats": True}
    assert evaluate_config('{"x": 1}') == {"gate-reference": '{"x": 1}'}


def test_pooled_reference_is_empty_without_sums_and_json_with_them():
    assert pooled_reference([{"hist-pos": [1.0]}]) == ""
    ref = GateReference.from_json(pooled_reference([_sums(0), _sums(1)]))
    assert len(ref.mean) == 48 and ref.n_images == 300.0 and 0 < ref.spread < 1


def test_strategy_state_keeps_the_reference_across_a_resume():
    state = strategy_state(SimpleNamespace(threshold=0.3, gate_reference="REF"))
    resumed = SimpleNamespace()
    load_strategy_state(resumed, state)
    assert resumed.gate_reference == "REF"
    load_strategy_state(resumed, {"threshold": 0.5})  # a checkpoint written before the gate existed
    assert resumed.gate_reference == ""


def _history(values: int = 48) -> list[dict]:
    return [{"round": 1, "sites": {"a": {**_sums(0, values=values)}, "b": {**_sums(1, values=values)}}},
            {"round": 2, "sites": {"a": {}, "b": {}}},
            {"round": 3, "sites": {"a": _hist(2), "b": _hist(3), "c": _hist(4)}}]


def test_export_rebuilds_the_reference_the_coordinator_sent_and_sets_the_cut_off():
    history = _history()
    assert reference_from_history(history).to_json() == pooled_reference([history[0]["sites"]["b"], history[0]["sites"]["a"]])
    model = build_model("scatternet", num_outputs=1)
    score, cut, text = export_gate(history, model, exported_last=False)  # fixed features: any exported round
    doc = json.loads(text)
    assert isinstance(score, OodScore) and doc["schema"] == "fedxray.ood/1" and doc["output"] == "ood_score"
    assert doc["cutoff"] == cut.cutoff == pytest.approx(3 * cut.q98) and doc["reference_images"] == 300.0
    assert 500 < doc["validation_images"] < 700 and doc["refused_estimate"] < 0.02 + 3 * doc["refused_sd"]
    with torch.no_grad():
        assert score(torch.rand((2, 1, 64, 64))).shape == (2,)


def test_no_image_check_without_histograms_or_for_a_cnn_exported_from_an_earlier_round(caplog):
    assert export_gate(_history()[:2], build_model("scatternet", num_outputs=1), exported_last=True) is None
    history = _history(values=32)
    cnn = build_model("mobilenet_v2", num_outputs=1)
    with caplog.at_level("WARNING", logger="flwr.fedxray"):
        assert export_gate(history, cnn, exported_last=False) is None
    assert any("penultimate layer changed" in r.message for r in caplog.records)
    assert export_gate(history, cnn, exported_last=True) is not None
    assert math.isfinite(export_gate(history, cnn, exported_last=True)[1].cutoff)


def test_a_reference_of_another_descriptor_gets_no_image_check(caplog):
    """Sums of the texture-only descriptor (32 values) cannot score a ScatterNet whose descriptor has a layout (48)."""
    with caplog.at_level("WARNING", logger="flwr.fedxray"):
        assert export_gate(_history(values=32), build_model("scatternet", num_outputs=1), exported_last=True) is None
    assert any("another model" in r.message for r in caplog.records)
