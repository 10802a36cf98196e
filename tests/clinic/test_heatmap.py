"""Tests for clinic.heatmap: attributions from the ONNX graph alone, and the overlay a reader sees."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from conftest import chest, export_scatternet
from onnx import TensorProto, helper

from clinic.heatmap import OVERLAY_MAX_SIDE, Explainer, find_linear_head, heat_levels, overlay
from common.models import build_model
from common.onnx_export import export_onnx, load_onnx_model
from common.preprocess import to_model_input


def _input(seed: int = 0) -> np.ndarray:
    return to_model_input(chest(seed=seed), 64)


def _upper_left_only(weight: torch.Tensor) -> None:
    """Head weights that read the upper-left quadrant of the 16 x 16 scattering grid only."""
    grid = weight.view(weight.shape[0], -1, 16, 16)
    grid.zero_()
    grid[:, :, :8, :8] = torch.linspace(-0.02, 0.03, grid.shape[1])[None, :, None, None]


class TestLinearHead:
    def test_scatternet_map_is_an_exact_decomposition_of_the_logit(self, scatter_model) -> None:
        data = scatter_model.read_bytes()
        head = find_linear_head(onnx.load_from_string(data))
        assert head is not None and not head.pooled and head.weight.shape == (1, 81 * 16 * 16)
        explainer = Explainer(data, "binary")
        assert explainer.method == "linear-head"
        x = _input()
        probs, attribution = explainer.explain(x, 0)
        assert attribution.shape == (16, 16)
        np.testing.assert_allclose(probs, load_onnx_model(scatter_model).predict(x)[0], atol=1e-6)
        logit = np.log(probs[0]) - np.log1p(-probs[0])
        assert 0.01 < probs[0] < 0.99  # not saturated: the logit is known precisely
        assert attribution.sum(dtype=np.float64) + head.bias[0] == pytest.approx(logit, abs=1e-4)

    def test_calibrated_export_keeps_the_exact_map(self, tmp_path) -> None:
        """The export's Platt step (a * logit + b before the sigmoid) folds into the head's weight and bias."""
        from common.calibration import Calibrated

        torch.manual_seed(0)
        model = build_model("scatternet", num_outputs=1)
        with torch.no_grad():
            model.head.classifier.weight.normal_(0.0, 0.01)
        path = tmp_path / "calibrated.onnx"
        export_onnx(Calibrated(model, 0.5, -0.3), path, task="binary", labels=["opacity"], input_size=(64, 64),
                    threshold=0.5, metadata={"model": "scatternet", "rounds": "1", "sites": "[]", "epsilon": "{}"})
        head = find_linear_head(onnx.load(path))
        assert head is not None
        np.testing.assert_allclose(head.bias, model.head.classifier.bias.detach().numpy() * 0.5 - 0.3, atol=1e-6)
        explainer = Explainer(path.read_bytes(), "binary")
        assert explainer.method == "linear-head"
        probs, attribution = explainer.explain(_input(), 0)
        logit = np.log(probs[0]) - np.log1p(-probs[0])
        assert attribution.sum(dtype=np.float64) + head.bias[0] == pytest.approx(logit, abs=1e-4)

    def test_evidence_stays_where_the_weights_look(self, tmp_path) -> None:
        path = export_scatternet(tmp_path / "ul.onnx", weight=_upper_left_only)
        explainer = Explainer(path.read_bytes(), "binary")
        probs, attribution = explainer.explain(_input(), 0)
        assert np.abs(attribution[:8, :8]).sum() > 0
        assert np.all(attribution[8:, :] == 0) and np.all(attribution[:, 8:] == 0)
        # occlusion (the model-agnostic fallback) finds the same quadrant on its 8 x 8 grid
        occ = np.abs(explainer.occlusion(_input(), probs, 0))
        row, col = np.unravel_index(np.argmax(occ), occ.shape)
        assert row < 4 and col < 4
        # The model equalises each image's histogram (a map of the whole image): hiding one patch moves every
        # pixel's rank a little, so occlusion spreads more than the exact map does (2.6x measured, 3x+ without it).
        assert occ[:4, :4].mean() > 2 * occ[4:, 4:].mean()

    def test_softmax_models_decompose_too(self, tmp_path) -> None:
        path = export_scatternet(tmp_path / "mc.onnx", labels=("a", "b", "c"), task="multiclass")
        explainer = Explainer(path.read_bytes(), "multiclass")
        assert explainer.method == "linear-head"
        probs, maps = explainer.run(_input())
        assert probs.shape == (1, 3) and maps.shape == (1, 3, 16, 16)

    def test_cnn_gets_a_class_activation_map(self, tmp_path) -> None:
        torch.manual_seed(0)
        model = build_model("mobilenet_v2", num_outputs=1)
        export_onnx(model, tmp_path / "m.onnx", task="binary", labels=["opacity"], input_size=(64, 64), threshold=0.5,
                    metadata={"model": "mobilenet_v2", "rounds": "1", "sites": "[]", "epsilon": "{}"})
        data = (tmp_path / "m.onnx").read_bytes()
        head = find_linear_head(onnx.load_from_string(data))
        assert head is not None and head.pooled
        explainer = Explainer(data, "binary")
        assert explainer.method == "linear-head"
        assert explainer.explain(_input(), 0)[1].shape == (2, 2)  # 64 px / 32: the last feature map


def _mean_brightness_model() -> bytes:
    """probabilities = sigmoid(8 * mean(image) - 4): no linear head, so occlusion must be used."""
    nodes = [
        helper.make_node("ReduceMean", ["image"], ["m"], axes=[2, 3], keepdims=0),
        helper.make_node("Mul", ["m", "eight"], ["s"]),
        helper.make_node("Sub", ["s", "four"], ["z"]),
        helper.make_node("Sigmoid", ["z"], ["probabilities"]),
    ]
    graph = helper.make_graph(
        nodes, "brightness",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, 64, 64])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 1])],
        [helper.make_tensor("eight", TensorProto.FLOAT, [], [8.0]), helper.make_tensor("four", TensorProto.FLOAT, [], [4.0])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8).SerializeToString()


class TestOcclusion:
    def test_any_graph_falls_back_to_occlusion_and_finds_the_bright_patch(self) -> None:
        explainer = Explainer(_mean_brightness_model(), "binary")
        assert explainer.method == "occlusion"
        x = np.full((1, 1, 64, 64), 0.2, np.float32)
        x[0, 0, 16:24, 40:48] = 1.0  # one occlusion cell (row 2, column 5) is bright
        probs, attribution = explainer.explain(x, 0)
        assert attribution.shape == (8, 8)
        assert np.unravel_index(np.argmax(attribution), attribution.shape) == (2, 5)
        assert attribution[2, 5] > 0 and probs.shape == (1,)


class TestOverlay:
    def test_size_caption_and_colour_only_where_the_evidence_is(self) -> None:
        pixels = np.tile(np.linspace(0, 1, 1500, dtype=np.float32), (1200, 1))
        attribution = np.zeros((16, 16), np.float32)
        attribution[12:, 12:] = 1.0  # lower-right
        attribution[:4, :4] = -1.0  # evidence against: not shown
        rgb = overlay(pixels, attribution, "opacity p=0.900")
        assert rgb.dtype == np.uint8 and rgb.shape == (819, OVERLAY_MAX_SIDE, 3)
        grey = rgb[200:400, 50:300].astype(int)  # upper-left, below the caption band
        assert np.abs(grey[..., 0] - grey[..., 2]).max() <= 1
        hot = rgb[-80:, -80:].astype(int)
        assert np.abs(hot[..., 0] - hot[..., 2]).mean() > 40
        assert rgb[2:8, :].mean() < rgb[300:320, 900:].mean()  # the caption band is dark

    def test_no_positive_evidence_gives_no_colour(self) -> None:
        assert not heat_levels(-np.ones((4, 4), np.float32), (32, 32)).any()
        levels = heat_levels(np.arange(16, dtype=np.float32).reshape(4, 4) - 5, (8, 8))
        assert levels.max() == pytest.approx(1.0) and levels.min() == 0.0


def test_quantised_graph_keeps_the_exact_map(scatter_model, tmp_path) -> None:
    """int8 models keep their last layer in float (clinic.quantize), so the map stays exact."""
    from clinic.quantize import quantize_model

    out = quantize_model(scatter_model, tmp_path / "m.int8.onnx")
    explainer = Explainer(out.read_bytes(), "binary")
    assert explainer.method == "linear-head"
    assert json.loads(load_onnx_model(out).meta["quantization"])["kept_float"]
