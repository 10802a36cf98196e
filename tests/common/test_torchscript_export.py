"""Tests for common/torchscript_export.py: model.pt beside model.onnx, same metadata, parity, loading."""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from common.models import build_model
from common.onnx_export import ExportError, OnnxModelError, export_onnx, load_onnx_model
from common.torchscript_export import (
    METADATA_FILE,
    TorchScriptModelError,
    export_torchscript,
    is_torchscript,
    load_torchscript_model,
)

META = {
    "model": "scatternet",
    "rounds": "4",
    "export_round": "3",
    "sites": json.dumps(["site-a", "site-b"]),
    "epsilon": json.dumps({"site-a": 2.5, "site-b": None}),
    "calibration": json.dumps({"method": "platt", "a": 0.8, "b": -0.1}),
    "bundle_sha256": "ab" * 32,
    "reference": json.dumps({"stub": True}),
}


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _export_pair(tmp_path: Path, name: str = "scatternet", size: int = 64, task: str = "binary",
                 labels: tuple[str, ...] = ("opacity",)) -> tuple[torch.nn.Module, Path]:
    torch.manual_seed(0)
    model = build_model(name, num_outputs=len(labels), **({"image_size": size} if name == "scatternet" else {}))
    if name == "scatternet":
        with torch.no_grad():
            model.head.classifier.weight.normal_(0.0, 0.01)
    onnx_path = tmp_path / "model.onnx"
    export_onnx(model, onnx_path, task=task, labels=list(labels), input_size=(size, size), threshold=0.42,
                metadata={**META, "model": name})
    return model, onnx_path


@pytest.fixture(scope="module")
def scatter_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path, Path]:
    tmp = tmp_path_factory.mktemp("ts")
    model, onnx_path = _export_pair(tmp)
    export_torchscript(model, tmp / "model.pt", onnx_model=onnx_path)
    return model, onnx_path, tmp / "model.pt"


class TestExportTorchscript:
    @pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.load's deprecation notice
    def test_same_metadata_as_the_onnx_model(self, scatter_pair) -> None:
        _, onnx_path, pt_path = scatter_pair
        onnx_props = {p.key: p.value for p in onnx.load(str(onnx_path)).metadata_props}
        extra = {METADATA_FILE: ""}
        torch.jit.load(str(pt_path), _extra_files=extra)  # what libtorch / plain torch users do
        assert json.loads(extra[METADATA_FILE]) == onnx_props
        for key in ("fedxray.labels", "fedxray.threshold", "fedxray.calibration", "fedxray.epsilon", "fedxray.rounds",
                    "fedxray.bundle_sha256", "fedxray.reference", "fedxray.created"):
            assert key in onnx_props
        clf = load_torchscript_model(pt_path)
        assert clf.meta["epsilon"] == {"site-a": 2.5, "site-b": None} and clf.meta["threshold"] == 0.42
        assert clf.labels == ["opacity"] and clf.input_size == (64, 64)

    def test_reproduces_torch_and_onnx_at_any_batch_size(self, scatter_pair) -> None:
        model, onnx_path, pt_path = scatter_pair
        clf = load_torchscript_model(pt_path)
        x = torch.rand((5, 1, 64, 64), generator=torch.Generator().manual_seed(3))
        with torch.inference_mode():
            eager = torch.sigmoid(model.eval()(x)).numpy()
        got = clf.predict(x.numpy(), batch_size=2)
        assert got.shape == (5, 1) and got.dtype == np.float32
        assert np.max(np.abs(got - eager)) <= 1e-5
        assert np.max(np.abs(got - load_onnx_model(onnx_path).predict(x.numpy()))) <= 1e-4

    def test_reports_parity_on_the_reference_batch(self, tmp_path: Path) -> None:
        model, onnx_path = _export_pair(tmp_path, "mobilenet_v2", size=32, task="multilabel", labels=("a", "b"))
        sample = torch.rand((4, 1, 32, 32))
        report = export_torchscript(model, tmp_path / "model.pt", onnx_model=onnx_path, sample_batch=sample)
        assert report.max_abs_diff <= 1e-4 and report.method == "trace" and report.size_bytes > 0
        assert load_torchscript_model(report.path).predict(sample.numpy()).shape == (4, 2)

    def test_densenet_traces_at_small_size(self, tmp_path: Path) -> None:
        model, onnx_path = _export_pair(tmp_path, "densenet121", size=32)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # neither the deprecation notice nor the tracer's shape-check notice leaks
            report = export_torchscript(model, tmp_path / "model.pt", onnx_model=onnx_path)
        assert report.max_abs_diff <= 1e-4

    def test_parity_failure_is_loud_and_writes_nothing(self, scatter_pair, tmp_path: Path, monkeypatch) -> None:
        model, onnx_path, _ = scatter_pair
        original = torch.jit.load

        def skewed(*args, **kwargs):
            module = original(*args, **kwargs)
            return lambda x: module(x) + 0.01

        monkeypatch.setattr(torch.jit, "load", skewed)
        with pytest.raises(ExportError, match=r"differs from torch eager by 0\.01.*was not written"):
            export_torchscript(model, tmp_path / "model.pt", onnx_model=onnx_path)
        assert list(tmp_path.iterdir()) == []

    def test_needs_a_fedxray_onnx_model_beside_it(self, tmp_path: Path) -> None:
        with pytest.raises(ExportError, match="cannot read the ONNX model"):
            export_torchscript(torch.nn.Linear(1, 1), tmp_path / "model.pt", onnx_model=tmp_path / "missing.onnx")


class TestLoadTorchscript:
    def test_state_dict_is_refused_with_the_fix(self, tmp_path: Path) -> None:
        path = tmp_path / "weights.pt"
        torch.save({"w": torch.zeros(2)}, path)
        assert is_torchscript(path)  # a zip too: only loading tells them apart
        with pytest.raises(TorchScriptModelError, match="state_dict saved with torch.save is not a model"):
            load_torchscript_model(path)

    @pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.trace/save's deprecation notice
    def test_torchscript_without_metadata_is_refused(self, tmp_path: Path) -> None:
        path = tmp_path / "plain.pt"
        torch.jit.save(torch.jit.trace(torch.nn.Identity(), torch.zeros(1)), str(path))
        with pytest.raises(OnnxModelError, match="not a fedxray model"):
            load_torchscript_model(path)

    def test_onnx_is_not_torchscript(self, scatter_pair, tmp_path: Path) -> None:
        _, onnx_path, pt_path = scatter_pair
        assert not is_torchscript(onnx_path) and is_torchscript(pt_path) and not is_torchscript(tmp_path / "none.pt")

    def test_wrong_input_is_refused(self, scatter_pair) -> None:
        clf = load_torchscript_model(scatter_pair[2])
        with pytest.raises(TorchScriptModelError, match=r"expects images \[N,1,64,64\]"):
            clf.predict(np.zeros((1, 1, 32, 32), np.float32))
        with pytest.raises(TorchScriptModelError, match="divide by 255"):
            clf.predict(np.full((1, 1, 64, 64), 255, np.float32))
