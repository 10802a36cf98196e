"""Tests for common.scattering and the ScatterNet model built on it.

The reference is kymatio's own torch front end (its FFT implementation): the matrix-product
transform must give the same coefficients, in the same channel order, to float precision.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from float32_tolerance import sum_tolerance
from kymatio.scattering2d.frontend.torch_frontend import ScatteringTorch2D
from opacus.validators import ModuleValidator

from common.models import ModelError, ScatterNet, build_model, count_parameters, describe, split_features
from common.onnx_export import export_onnx, load_onnx_model
from common.scattering import (
    Scattering2D,
    ScatteringError,
    group_count,
    scattering_channels,
    scattering_output_size,
)


@pytest.fixture(autouse=True, scope="module")
def _threads(one_torch_thread: None) -> None:
    """Every test here on one torch thread (see tests/conftest.py)."""


class TestScattering2D:
    @pytest.mark.parametrize(("J", "size"), [(1, 16), (2, 32), (2, 64), (2, 50), (3, 64)])
    def test_equals_kymatio(self, J: int, size: int) -> None:  # noqa: N803 - the field's name
        x = torch.rand(3, size, size, generator=torch.Generator().manual_seed(J * size))
        expected = ScatteringTorch2D(J=J, shape=(size, size))(x)
        got = Scattering2D(J, (size, size))(x)
        assert got.shape == expected.shape
        # Two float32 FFT implementations: each of the 6 transforms on the deepest path (FFT, filter, inverse FFT
        # for psi1, psi2 and phi) sums through log2 of its grid's points in butterflies (padding at most doubles
        # each side), relative to the largest coefficient.
        stages = 6 * 2 * math.ceil(math.log2(2 * size))
        torch.testing.assert_close(got, expected, rtol=0, atol=sum_tolerance(stages, expected.abs().max()))

    def test_channel_and_size_formulas_match_the_output(self) -> None:
        for J, size in ((1, 16), (2, 64), (3, 128)):
            out = Scattering2D(J, (size, size))(torch.rand(1, size, size))
            assert out.shape[1] == scattering_channels(J) == Scattering2D(J, (size, size)).out_channels
            assert out.shape[2] == out.shape[3] == scattering_output_size(size, J)
        assert scattering_channels(2) == 81 and scattering_channels(3) == 217

    def test_accepts_a_channel_axis_and_nothing_is_trainable_or_stored(self) -> None:
        sc = Scattering2D(2, (32, 32))
        x = torch.rand(2, 32, 32)
        torch.testing.assert_close(sc(x[:, None]), sc(x))
        assert list(sc.parameters()) == []
        assert sc.state_dict() == {}  # filters are rebuilt, never shipped

    def test_a_brighter_image_changes_the_coefficients(self) -> None:
        sc = Scattering2D(2, (32, 32))
        x = torch.rand(1, 32, 32)
        assert not torch.allclose(sc(x), sc(0.5 * x))

    def test_wrong_input_size_names_the_expected_shape(self) -> None:
        with pytest.raises(ScatteringError, match=r"\[B, 32, 32\]"):
            Scattering2D(2, (32, 32))(torch.rand(2, 64, 64))

    @pytest.mark.parametrize(("J", "size"), [(0, 32), (4, 8), (3, 6)])
    def test_impossible_settings_are_refused(self, J: int, size: int) -> None:  # noqa: N803
        with pytest.raises(ScatteringError):
            Scattering2D(J, (size, size))

    def test_group_count_is_a_divisor_near_a_third(self) -> None:
        assert group_count(81) == 27 and group_count(217) == 31 and group_count(9) == 3
        for c in (9, 81, 217, 50):
            assert c % group_count(c) == 0


class TestScatterNet:
    def test_default_is_the_dp_first_linear_head(self) -> None:
        model = build_model("scatternet", num_outputs=1)
        assert isinstance(model, ScatterNet)
        assert count_parameters(model) == 81 * 16 * 16 + 1
        assert list(model.state_dict()) == ["head.classifier.weight", "head.classifier.bias"]
        assert ModuleValidator.validate(model, strict=True) == []
        with torch.no_grad():
            assert torch.equal(model(torch.rand(2, 1, 64, 64)), torch.zeros(2, 1))  # zero-initialised head

    def test_cnn_head_is_small_and_dp_ready(self) -> None:
        model = build_model("scatternet", num_outputs=3, head="cnn")
        assert 30_000 < count_parameters(model) <= 60_000
        assert ModuleValidator.validate(model, strict=True) == []
        with torch.no_grad():
            assert model(torch.rand(2, 1, 64, 64)).shape == (2, 3)

    def test_head_on_features_equals_the_whole_model(self) -> None:
        torch.manual_seed(0)
        model = build_model("scatternet", num_outputs=2, image_size=32, head="cnn").eval()
        frontend, head, prefix = split_features(model)
        x = torch.rand(3, 1, 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(head(frontend(x)), model(x))
        assert prefix == "head." and all(k.startswith(prefix) for k in model.state_dict())

    def test_image_size_and_j_are_part_of_the_architecture(self) -> None:
        model = build_model("scatternet", num_outputs=1, image_size=128, scatter_j=3)
        assert count_parameters(model) == 217 * 16 * 16 + 1
        with pytest.raises(ModelError, match=r"\[N, 1, 128, 128\]"):
            model(torch.rand(1, 1, 64, 64))
        with pytest.raises(ModelError, match="head"):
            build_model("scatternet", num_outputs=1, head="transformer")

    def test_describe_says_what_trains(self) -> None:
        info = describe("scatternet", num_outputs=1)
        assert info["parameters"] == 20737
        assert "no trainable parameters" in str(info["architecture"]) and "J=2" in str(info["architecture"])


def test_onnx_export_holds_the_front_end_and_matches_torch(tmp_path, fedxray_data) -> None:
    """Contract 3: grey image in, probability out, scattering inside the graph; parity on real radiographs."""
    from common.onnx_export import reference_batch

    torch.manual_seed(0)
    model = build_model("scatternet", num_outputs=1)
    with torch.no_grad():
        model.head.classifier.weight.normal_(0, 0.01)
    sample = reference_batch(fedxray_data / "dicom", (64, 64), limit=6)
    report = export_onnx(model, tmp_path / "m.onnx", task="binary", labels=["opacity"], input_size=(64, 64),
                         threshold=0.5, sample_batch=sample,
                         metadata={"model": "scatternet", "rounds": "1", "sites": "[]", "epsilon": "{}"})
    assert report.max_abs_diff <= 1e-5
    onnx_model = load_onnx_model(tmp_path / "m.onnx")
    with torch.no_grad():
        expected = torch.sigmoid(model(sample)).numpy()
    np.testing.assert_allclose(onnx_model.predict(sample.numpy()), expected, atol=1e-5)
