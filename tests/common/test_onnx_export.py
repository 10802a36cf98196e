"""Tests for common/onnx_export.py: interface 3 (names, shapes, dynamic batch, metadata, parity)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torchvision
from torch import nn

from common.onnx_export import (
    ExportError,
    ExportMetadataError,
    ExportReport,
    OnnxModelError,
    export_onnx,
    load_onnx_model,
)

SIZE = (32, 32)
META = {
    "model": "mobilenet_v2",
    "rounds": "3",
    "sites": json.dumps(["site-a", "site-b"]),
    "epsilon": json.dumps({"site-a": 2.5, "site-b": 3.0}),
}


class TinyMobileNet(nn.Module):
    """MobileNetV2-style stand-in with the build_model contract: [N,1,H,W] in [0,1] -> logits."""

    def __init__(self, num_outputs: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torchvision.models.mobilenet_v2(weights=None, num_classes=num_outputs, width_mult=0.25)
        first = self.net.features[0][0]
        self.net.features[0][0] = nn.Conv2d(1, first.out_channels, 3, 2, 1, bias=False)
        self.register_buffer("mean", torch.tensor(0.5))
        self.register_buffer("std", torch.tensor(0.25))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.net((image - self.mean) / self.std)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread() -> Iterator[None]:
    """These models are tiny: one thread is as fast, and on a shared 2-core machine two spinning
    OpenMP threads made a 32 px forward pass take seconds instead of milliseconds."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _export(model: nn.Module, path: Path, task: str, labels: list[str], **kw: Any) -> ExportReport:
    return export_onnx(model, path, task=task, labels=labels, input_size=SIZE, threshold=0.42, metadata=META, **kw)


def _images(n: int, seed: int = 1) -> torch.Tensor:
    return torch.rand((n, 1, *SIZE), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def binary(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path, ExportReport]:
    model = TinyMobileNet(1)
    # a few steps of training so BatchNorm running stats are not the identity defaults
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        model(_images(8, seed=7)).sum().backward()
        opt.step()
    model.train()  # left in train mode on purpose: export must use eval mode without changing it
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    report = _export(model, path, "binary", ["opacity"], sample_batch=_images(4, seed=3))
    return model, path, report


class TestBinaryExport:
    def test_report_describes_the_file(self, binary: tuple) -> None:
        model, path, report = binary
        assert report.path == path and path.is_file()
        assert report.size_bytes == path.stat().st_size > 0
        assert report.n_params == sum(p.numel() for p in model.parameters())
        assert report.opset == 17 and 0 <= report.max_abs_diff <= 1e-4

    def test_graph_names_and_shapes(self, binary: tuple) -> None:
        _, path, _ = binary
        proto = onnx.load(str(path))
        (inp,) = proto.graph.input
        (out,) = proto.graph.output
        assert inp.name == "image" and out.name == "probabilities"
        assert inp.type.tensor_type.elem_type == out.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        in_dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
        out_dims = [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim]
        assert isinstance(in_dims[0], str) and in_dims[1:] == [1, 32, 32]
        assert isinstance(out_dims[0], str) and out_dims[1:] == [1]
        assert {op.domain for op in proto.opset_import} <= {"", "ai.onnx"}

    @pytest.mark.parametrize("n", [1, 3])
    def test_dynamic_batch_matches_torch(self, binary: tuple, n: int) -> None:
        model, path, _ = binary
        clf = load_onnx_model(path)
        x = _images(n, seed=10 + n)
        probs = clf.predict(x.numpy())
        assert probs.shape == (n, 1) and probs.dtype == np.float32
        assert ((probs >= 0) & (probs <= 1)).all()
        was_training = model.training
        model.eval()
        with torch.no_grad():
            expected = torch.sigmoid(model(x)).numpy()
        model.train(was_training)
        np.testing.assert_allclose(probs, expected, atol=1e-4)

    def test_callers_model_left_as_it_was(self, binary: tuple) -> None:
        model, _, _ = binary
        assert model.training and next(model.parameters()).device.type == "cpu"

    def test_metadata_round_trips(self, binary: tuple) -> None:
        _, path, _ = binary
        clf = load_onnx_model(path, threads=1)
        meta = clf.meta
        assert meta["task"] == "binary" and meta["labels"] == ["opacity"] == clf.labels
        assert meta["input_size"] == (32, 32) == clf.input_size
        assert meta["threshold"] == 0.42 and meta["model"] == "mobilenet_v2" and meta["rounds"] == 3
        assert meta["sites"] == ["site-a", "site-b"]
        assert meta["epsilon"] == {"site-a": 2.5, "site-b": 3.0}
        created = datetime.fromisoformat(meta["created"])
        assert created.utcoffset() == timedelta(0)
        assert datetime.now(UTC) - created < timedelta(hours=1)
        raw = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
        assert raw["fedxray.input_size"] == "32,32" and json.loads(raw["fedxray.labels"]) == ["opacity"]
        assert all(isinstance(v, str) for v in raw.values())

    def test_predict_rejects_wrong_images(self, binary: tuple) -> None:
        clf = load_onnx_model(binary[1])
        with pytest.raises(OnnxModelError, match=r"\[N,1,32,32\]"):
            clf.predict(np.zeros((2, 1, 64, 64), np.float32))
        with pytest.raises(OnnxModelError, match="divide by 255"):
            clf.predict(np.full((1, 1, 32, 32), 200, np.float32))

    def test_predict_in_chunks_equals_one_batch(self, binary: tuple) -> None:
        clf = load_onnx_model(binary[1])
        x = _images(5, seed=20).numpy()
        np.testing.assert_allclose(clf.predict(x, batch_size=2), clf.predict(x), atol=1e-6)


class TestOtherTasks:
    def test_multiclass_rows_sum_to_one(self, tmp_path: Path) -> None:
        labels = ["normal", "bacterial", "viral"]
        _export(TinyMobileNet(3), tmp_path / "mc.onnx", "multiclass", labels)
        clf = load_onnx_model(tmp_path / "mc.onnx")
        probs = clf.predict(_images(4).numpy())
        assert probs.shape == (4, 3) and clf.meta["labels"] == labels
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)

    def test_multilabel_is_independent_sigmoids(self, tmp_path: Path) -> None:
        model = TinyMobileNet(2).eval()
        with torch.no_grad():  # push the logits apart so sigmoids cannot sum to one by chance
            model.net.classifier[1].bias.copy_(torch.tensor([3.0, 2.0]))
        _export(model, tmp_path / "ml.onnx", "multilabel", ["effusion", "opacity"])
        probs = load_onnx_model(tmp_path / "ml.onnx").predict(_images(2).numpy())
        with torch.no_grad():
            expected = torch.sigmoid(model(_images(2))).numpy()
        np.testing.assert_allclose(probs, expected, atol=1e-4)
        assert (probs.sum(axis=1) > 1.2).all()


class TestValidation:
    def test_missing_metadata_lists_every_key(self, tmp_path: Path) -> None:
        path = tmp_path / "m.onnx"
        with pytest.raises(ExportMetadataError) as info:
            export_onnx(
                TinyMobileNet(1),
                path,
                task="binary",
                labels=["opacity"],
                input_size=SIZE,
                threshold=0.5,
                metadata={"model": "mobilenet_v2", "sites": "2"},
            )
        assert "fedxray.rounds" in str(info.value) and "fedxray.epsilon" in str(info.value)
        assert "fedxray.model" not in str(info.value)
        assert isinstance(info.value, ValueError) and isinstance(info.value, ExportError)
        assert not path.exists() and list(tmp_path.iterdir()) == []

    def test_collects_all_argument_problems(self, tmp_path: Path) -> None:
        with pytest.raises(ExportMetadataError) as info:
            export_onnx(
                TinyMobileNet(1),
                tmp_path / "m.onnx",
                task="binary",
                labels=["a", "b"],
                input_size=SIZE,
                threshold=1.5,
                metadata={**META, "rounds": 3, "epsilon": "[1, 2]", "task": "binary"},  # type: ignore[dict-item]
            )
        assert len(info.value.problems) == 5, info.value.problems

    def test_input_size_must_be_a_pair(self, tmp_path: Path) -> None:
        with pytest.raises(ExportMetadataError, match="input_size"):
            export_onnx(
                TinyMobileNet(1),
                tmp_path / "m.onnx",
                task="binary",
                labels=["x"],
                input_size=32,  # type: ignore[arg-type]
                threshold=0.5,
                metadata=META,
                sample_batch=_images(1),
            )

    def test_site_without_dp_has_null_epsilon(self, tmp_path: Path) -> None:
        model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 1))
        meta = {**META, "epsilon": json.dumps({"site-a": 1.0, "site-b": None}), "strategy": "fedavg"}
        export_onnx(model, tmp_path / "m.onnx", task="binary", labels=["x"], input_size=SIZE, threshold=0.5, metadata=meta)
        clf = load_onnx_model(tmp_path / "m.onnx")
        assert clf.meta["epsilon"] == {"site-a": 1.0, "site-b": None}
        assert clf.meta["strategy"] == "fedavg"  # extra keys kept as strings

    def test_output_width_must_match_labels(self, tmp_path: Path) -> None:
        with pytest.raises(ExportMetadataError, match="num_outputs=3"):
            _export(TinyMobileNet(1), tmp_path / "m.onnx", "multiclass", ["a", "b", "c"])

    def test_sample_batch_shape_checked(self, tmp_path: Path) -> None:
        with pytest.raises(ExportMetadataError, match="sample_batch"):
            _export(TinyMobileNet(1), tmp_path / "m.onnx", "binary", ["x"], sample_batch=torch.rand(2, 3, 32, 32))

    @pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript-based ONNX export:DeprecationWarning")
    @pytest.mark.filterwarnings("ignore:The feature will be removed:DeprecationWarning")
    def test_non_fedxray_onnx_is_refused(self, tmp_path: Path) -> None:
        path = tmp_path / "plain.onnx"
        torch.onnx.export(
            nn.Sequential(nn.Flatten(), nn.Linear(4, 1)),
            (torch.rand(1, 1, 2, 2),),
            str(path),
            input_names=["image"],
            output_names=["probabilities"],
            dynamo=False,
        )
        with pytest.raises(OnnxModelError, match="fedxray.task"):
            load_onnx_model(path)
        with pytest.raises(OnnxModelError, match="not found"):
            load_onnx_model(tmp_path / "absent.onnx")


class TestParityFailure:
    def test_fails_loudly_and_leaves_nothing(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        previous = tmp_path / "model.onnx"
        previous.write_bytes(b"the model from the last good export")
        original_run = ort.InferenceSession.run

        def skewed_run(self: ort.InferenceSession, *args: object, **kwargs: object) -> list[np.ndarray]:
            return [out + np.float32(1e-2) for out in original_run(self, *args, **kwargs)]

        monkeypatch.setattr(ort.InferenceSession, "run", skewed_run)
        with pytest.raises(ExportError, match=r"differs from torch by 0\.01.*tolerance 0\.0001"):
            _export(TinyMobileNet(1), previous, "binary", ["opacity"])
        # the old file is untouched and no temporary file is left next to it
        assert previous.read_bytes() == b"the model from the last good export"
        assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]

    def test_tolerance_is_what_decides(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        original_run = ort.InferenceSession.run

        def skewed_run(self: ort.InferenceSession, *args: object, **kwargs: object) -> list[np.ndarray]:
            return [out + np.float32(1e-2) for out in original_run(self, *args, **kwargs)]

        monkeypatch.setattr(ort.InferenceSession, "run", skewed_run)
        report = _export(TinyMobileNet(1), tmp_path / "m.onnx", "binary", ["opacity"], tolerance=0.05)
        assert report.max_abs_diff == pytest.approx(1e-2, rel=1e-2)
        assert (tmp_path / "m.onnx").is_file()


@pytest.mark.parametrize("name", ["mobilenet_v2", "densenet121"])
def test_build_model_exports(tmp_path: Path, name: str) -> None:
    """The project's own architectures (DP-ready form, as federation trains them) export cleanly."""
    models = pytest.importorskip("common.models", reason="common/models.py not written yet")
    torch.manual_seed(0)
    model = models.build_model(name, num_outputs=1, dp=True)
    report = export_onnx(
        model,
        tmp_path / "m.onnx",
        task="binary",
        labels=["opacity"],
        input_size=SIZE,
        threshold=0.5,
        metadata={**META, "model": name},
    )
    assert report.max_abs_diff <= 1e-4
    clf = load_onnx_model(report.path)
    assert clf.predict(_images(2).numpy()).shape == (2, 1) and clf.meta["model"] == name


def test_parity_on_real_radiographs(tmp_path: Path, dicom_dir: Path) -> None:
    """The parity batch can be real radiographs (the shared DICOM files), read as sites read them."""
    from common.models import build_model
    from common.onnx_export import reference_batch

    batch = reference_batch(dicom_dir, SIZE, limit=6)
    assert batch.shape[1:] == (1, *SIZE) and 1 <= len(batch) <= 6
    assert 0.0 <= float(batch.min()) and float(batch.max()) <= 1.0 and float(batch.std()) > 0.05  # real structure
    torch.manual_seed(0)
    report = export_onnx(build_model("mobilenet_v2", num_outputs=1, dp=True), tmp_path / "m.onnx", task="binary",
                         labels=["opacity"], input_size=SIZE, threshold=0.5, metadata=META, sample_batch=batch)
    assert report.max_abs_diff <= 1e-4


def test_reference_batch_refuses_empty_folder(tmp_path: Path) -> None:
    from common.onnx_export import reference_batch

    (tmp_path / "notes.txt").write_text("no images")
    with pytest.raises(ExportError, match="no readable radiograph"):
        reference_batch(tmp_path, SIZE)
    with pytest.raises(ExportError, match="not a folder"):
        reference_batch(tmp_path / "missing", SIZE)
