"""Tests for clinic.quantize and ``fl-predict quantize``: an int8 model that still describes itself."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import chest

from clinic.cli import main
from clinic.quantize import QUANT_KEY, QuantizeError, quantize_model
from common.onnx_export import OnnxModelError, load_onnx_model
from common.preprocess import to_model_input


def _inputs(n: int = 6) -> np.ndarray:
    return np.concatenate([to_model_input(chest(seed=i), 64) for i in range(n)])


def test_dynamic_int8_keeps_metadata_and_predictions(scatter_model, tmp_path) -> None:
    out = quantize_model(scatter_model, tmp_path / "model.int8.onnx")
    fp32, int8 = load_onnx_model(scatter_model), load_onnx_model(out)
    for key in ("labels", "threshold", "epsilon", "rounds", "sites", "model", "created"):
        assert int8.meta[key] == fp32.meta[key]
    info = json.loads(int8.raw_meta[QUANT_KEY])
    assert info["method"] == "dynamic" and info["calibration_images"] == 0 and len(info["source_sha256"]) == 64
    x = _inputs()
    np.testing.assert_allclose(int8.predict(x), fp32.predict(x), atol=0.05)


def test_static_needs_calibration_images(scatter_model, tmp_path) -> None:
    with pytest.raises(QuantizeError, match="--calibration"):
        quantize_model(scatter_model, tmp_path / "s.onnx", method="static")
    out = quantize_model(scatter_model, tmp_path / "s.onnx", method="static", calibration=[x[None] for x in _inputs(4)])
    assert json.loads(load_onnx_model(out).raw_meta[QUANT_KEY])["calibration_images"] == 4


def test_only_fedxray_models_are_quantised(tmp_path) -> None:
    (tmp_path / "junk.onnx").write_bytes(b"not onnx")
    with pytest.raises(OnnxModelError):
        quantize_model(tmp_path / "junk.onnx", tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists()


def test_cli_quantises_and_scores_with_the_int8_model(scatter_model, tmp_path, dicom_writer, capsys) -> None:
    out = tmp_path / "model.int8.onnx"
    assert main(["quantize", "--model", str(scatter_model), "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    image = dicom_writer(tmp_path / "in" / "a.dcm", chest())
    assert main(["--model", str(out), str(image), "--json", "--out", str(tmp_path / "res")]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["sr"] and rec["heatmap_png"] and 0 <= rec["probabilities"]["opacity"] <= 1


def test_calibrated_model_quantises_and_keeps_its_exact_heatmap(tmp_path) -> None:
    """fl-server exports a Platt-calibrated model (Add(Mul(logit, a), b) before the sigmoid): int8 must take it too."""
    import onnx
    import torch

    from clinic.heatmap import Explainer, find_linear_head
    from common.calibration import Calibrated
    from common.models import build_model
    from common.onnx_export import export_onnx

    torch.manual_seed(0)
    model = build_model("scatternet", num_outputs=1)
    with torch.no_grad():
        model.head.classifier.weight.normal_(0.0, 0.01)
    source = tmp_path / "calibrated.onnx"
    export_onnx(Calibrated(model, 0.5, -0.3), source, task="binary", labels=["opacity"], input_size=(64, 64),
                threshold=0.5, metadata={"model": "scatternet", "rounds": "1", "sites": "[]", "epsilon": "{}"})
    out = quantize_model(source, tmp_path / "calibrated.int8.onnx")
    kept = json.loads(load_onnx_model(out).raw_meta[QUANT_KEY])["kept_float"]
    assert any("Mul" in name for name in kept) and any("Add" in name for name in kept)
    head = find_linear_head(onnx.load(out))
    assert head is not None  # the calibration and the linear layer stayed float: the exact map still applies
    assert Explainer(out.read_bytes(), "binary").method == "linear-head"
    x = _inputs(4)
    np.testing.assert_allclose(load_onnx_model(out).predict(x), load_onnx_model(source).predict(x), atol=0.05)
