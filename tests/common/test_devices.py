"""Tests for common.devices and ``--device``: the device asked for, the one used, and a line when they differ."""

from __future__ import annotations

import json
import logging

import onnxruntime as ort
import pytest
import torch

from common import devices
from common.devices import CPU_PROVIDER, CUDA_PROVIDER, DeviceError, onnx_providers, torch_device

HAS_TORCH_CUDA = torch.cuda.is_available()
HAS_ORT_CUDA = CUDA_PROVIDER in ort.get_available_providers()


@pytest.fixture(autouse=True)
def _fresh_warnings():
    devices._warn_once.cache_clear()
    yield
    devices._warn_once.cache_clear()


def test_cpu_is_always_the_cpu() -> None:
    assert torch_device("cpu").type == "cpu"
    assert onnx_providers("cpu") == [CPU_PROVIDER]


def test_unknown_device_names_the_choices() -> None:
    with pytest.raises(DeviceError, match="auto, cpu, cuda"):
        torch_device("gpu0")


@pytest.mark.skipif(HAS_TORCH_CUDA, reason="this machine has a CUDA GPU: see test_cuda_is_used_when_present")
def test_cuda_without_a_gpu_falls_back_with_one_line(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="common.devices"):
        assert torch_device("cuda").type == "cpu"
        assert torch_device("cuda").type == "cpu"
        assert torch_device("auto").type == "cpu"
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "no CUDA GPU" in lines[0] and "training on the CPU" in lines[0]


@pytest.mark.skipif(HAS_ORT_CUDA, reason="this onnxruntime has the CUDA provider")
def test_onnxruntime_without_cuda_provider_says_what_to_install(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="common.devices"):
        assert onnx_providers("cuda") == [CPU_PROVIDER]
        assert onnx_providers("auto") == [CPU_PROVIDER]
    assert [r.getMessage() for r in caplog.records] == [
        "device cuda was asked for but this onnxruntime has no CUDA provider (install onnxruntime-gpu "
        "matching your CUDA version in place of onnxruntime): scoring on the CPU"
    ]


@pytest.mark.skipif(not HAS_TORCH_CUDA, reason="needs a CUDA GPU")
def test_cuda_is_used_when_present() -> None:
    assert torch_device("cuda").type == "cuda" and torch_device("auto").type == "cuda"
    x = torch.ones(4, device=torch_device("cuda"))
    assert x.is_cuda and float(x.sum()) == 4.0


def test_fl_predict_device_cuda_scores_and_reports_the_device_used(scatter_model_file, tmp_path, capsys, caplog) -> None:
    """fl-predict --device cuda on a machine without onnxruntime-gpu: scores on the CPU, says so, exits 0."""
    from PIL import Image

    from clinic.cli import main
    from clinic.model import Scorer

    image = tmp_path / "chest.png"
    Image.fromarray((torch.rand(80, 72).numpy() * 255).astype("uint8")).save(image)
    with caplog.at_level(logging.WARNING):
        assert main(["--model", str(scatter_model_file), "--device", "cuda", "--json", str(image)]) == 0
    out = capsys.readouterr()
    assert len([line for line in out.out.splitlines() if line.startswith("{")]) == 1
    assert json.loads(out.out.splitlines()[0])["probabilities"]
    scorer = Scorer(scatter_model_file, heatmaps=False, device="cuda")
    assert scorer.device == ("cuda" if HAS_ORT_CUDA else "cpu")
    if not HAS_ORT_CUDA:
        assert any("no CUDA provider" in r.getMessage() for r in caplog.records)


@pytest.fixture(scope="module")
def scatter_model_file(tmp_path_factory) -> object:
    from common.models import build_model
    from common.onnx_export import export_onnx

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("devices") / "model.onnx"
    export_onnx(build_model("scatternet", num_outputs=1), path, task="binary", labels=["opacity"], input_size=(64, 64),
                threshold=0.5, metadata={"model": "scatternet", "rounds": "1", "sites": "[]", "epsilon": "{}"})
    return path
