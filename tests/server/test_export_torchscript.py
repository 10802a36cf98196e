"""server/export.py at the end of a run: model.pt beside model.onnx, listed on the model card and in metrics.json."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from common.config import RunConfig
from common.models import build_model
from common.torchscript_export import load_torchscript_model
from server.checkpoint import Checkpoint, save_checkpoint
from server.export import finish


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _run_dir(tmp_path: Path) -> tuple[Path, RunConfig]:
    run = RunConfig.from_mapping({"num-server-rounds": 1})
    torch.manual_seed(0)
    model = build_model(run.model, num_outputs=1, **{k: v for k, v in run.model_kwargs().items() if k != "num_outputs"})
    with torch.no_grad():
        model.head.classifier.weight.normal_(0.0, 0.01)
    weights = {k: v.numpy() for k, v in model.state_dict().items()}
    history = [{"round": 1, "threshold": 0.5, "epsilon": {"site-a": 1.5}, "sites": {"site-a": {"num_examples": 10}}}]
    save_checkpoint(tmp_path, Checkpoint(1, weights, {}, history, run.to_mapping()))
    return tmp_path, run


def test_finish_writes_model_pt_with_the_onnx_metadata(tmp_path: Path) -> None:
    run_dir, run = _run_dir(tmp_path)
    finish(run_dir, "ts-run", run, {"version": "test", "bundle_sha256": "cd" * 32})
    onnx_props = {p.key: p.value for p in onnx.load(str(run_dir / "model.onnx")).metadata_props}
    clf = load_torchscript_model(run_dir / "model.pt")
    assert clf.raw_meta == onnx_props and clf.meta["epsilon"] == {"site-a": 1.5}
    x = np.random.default_rng(0).random((2, 1, run.image_size, run.image_size), dtype=np.float32)
    from common.onnx_export import load_onnx_model

    assert np.max(np.abs(clf.predict(x) - load_onnx_model(run_dir / "model.onnx").predict(x))) <= 1e-4
    export = json.loads((run_dir / "metrics.json").read_text())["export"]
    assert export["torchscript"]["path"] == "model.pt" and export["torchscript"]["max_abs_diff"] <= 1e-4
    assert "- TorchScript: `model.pt`, same metadata" in (run_dir / "model_card.md").read_text()


def test_a_failed_torchscript_export_is_named_on_the_card(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import server.export as export_module
    from common.onnx_export import ExportError

    def refuse(*args: object, **kwargs: object) -> None:
        raise ExportError("TorchScript differs from torch eager by 0.5")

    monkeypatch.setattr(export_module, "export_torchscript", refuse)
    run_dir, run = _run_dir(tmp_path)
    finish(run_dir, "ts-run", run)
    assert (run_dir / "model.onnx").is_file() and not (run_dir / "model.pt").exists()
    assert "`model.pt` **not written**: TorchScript differs" in (run_dir / "model_card.md").read_text()
