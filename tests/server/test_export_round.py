"""server/export.py: which round's weights become model.onnx (run setting export-round)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from common.config import RunConfig
from common.models import build_model
from common.onnx_export import load_onnx_model
from server.checkpoint import Checkpoint, save_best, save_checkpoint
from server.export import finish


def _weights(seed: int, run: RunConfig) -> dict[str, np.ndarray]:
    torch.manual_seed(seed)
    model = build_model(run.model, dp=True, **run.model_kwargs())
    with torch.no_grad():
        model.head.classifier.weight.normal_(0.0, 0.05)
    return {k: v.numpy().copy() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(("choice", "exported"), [("last", 2), ("best", 1)])
def test_export_round_picks_last_or_best(tmp_path: Path, choice: str, exported: int) -> None:
    run = RunConfig.from_mapping({"num-server-rounds": 2, "export-round": choice})
    first, last = _weights(1, run), _weights(2, run)
    history = [{"round": r, "pooled_auc": auc, "threshold": 0.5, "epsilon": {"site-a": 1.0}, "sites": {}}
               for r, auc in ((1, 0.9), (2, 0.8))]
    save_best(tmp_path, 1, first, 0.9)  # round 1 read better on the noised validation histograms
    save_checkpoint(tmp_path, Checkpoint(2, last, {}, history, run.to_mapping()))
    finish(tmp_path, "r", run)
    assert json.loads((tmp_path / "metrics.json").read_text())["export"]["round"] == exported
    expected = build_model(run.model, dp=True, **run.model_kwargs())
    expected.load_state_dict({k: torch.from_numpy(v) for k, v in (last if exported == 2 else first).items()})
    x = np.random.default_rng(0).random((2, 1, run.image_size, run.image_size), dtype=np.float32)
    want = torch.sigmoid(expected.eval()(torch.from_numpy(x))).detach().numpy()
    np.testing.assert_allclose(load_onnx_model(tmp_path / "model.onnx").predict(x), want, atol=1e-4)
    assert f"round {exported} of 2" in (tmp_path / "model_card.md").read_text()
