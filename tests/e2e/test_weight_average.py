"""fl-sim with the coordinator's weight average (server/ema.py): checkpointed, resumed and exported, end to end.

3 tiny simulated hospitals, 3 DP rounds through the real SuperLink and Flower's Simulation Engine,
``weight-average = 0.5``. The last checkpoint must hold the average of all three rounds, and the
exported model.onnx must be that average, not the last round's global model. (Resuming the average
from a checkpoint is tests/server/test_ema.py.)
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from common.config import RunConfig
from common.models import build_model
from common.onnx_export import load_onnx_model
from server.checkpoint import latest_checkpoint
from simulations.cli import main

pytestmark = pytest.mark.e2e


def test_the_exported_model_is_the_running_average_of_the_global_models(tmp_path):
    rc = main(["run", "--out", str(tmp_path), "--name", "ema", "--sites", "3", "--rounds", "3", "--image-size", "32",
               "--patients", "10", "--local-epochs", "1", "--target-epsilon", "4", "--max-epsilon", "10",
               "--partition", "label-skew", "--set", "weight-average=0.5"])
    assert rc == 0
    run_dir = tmp_path / "ema" / "run"
    ckpt = latest_checkpoint(run_dir)
    average = ckpt.strategy_state["weight_average"]
    assert ckpt.round == 3 and average["rounds"] == 3  # one fold per aggregated round
    key = "head.classifier.weight"
    assert not np.allclose(average["weights"][key], ckpt.weights[key])  # the average is not the last model

    run = RunConfig.from_mapping(ckpt.run_config)
    model = build_model(run.model, dp=True, **run.model_kwargs()).eval()
    model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in average["weights"].items()})
    onnx_model = load_onnx_model(run_dir / "model.onnx")
    calibration = json.loads(onnx_model.raw_meta.get("fedxray.calibration", "null") or "null") or {"a": 1.0, "b": 0.0}
    x = np.random.default_rng(0).random((4, 1, 32, 32), dtype=np.float32)
    with torch.no_grad():
        logits = model(torch.from_numpy(x)).double().numpy()[:, 0]
    expected = 1.0 / (1.0 + np.exp(-(calibration["a"] * logits + calibration["b"])))
    np.testing.assert_allclose(onnx_model.predict(x)[:, 0], expected, atol=1e-5)
