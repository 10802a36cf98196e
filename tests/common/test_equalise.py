"""Tests for common.equalise: the per-image histogram equalisation in the ScatterNet's graph."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
import torch

from common.equalise import HistogramEqualisation
from common.models import build_model, split_features
from common.onnx_export import export_onnx, load_onnx_model


@pytest.fixture(autouse=True, scope="module")
def _threads(one_torch_thread: None) -> None:
    """One torch thread (tests/conftest.py)."""


def _levels(n: int = 4, size: int = 16, seed: int = 0) -> torch.Tensor:
    """Images of uint8 display values / 255, as the site cache gives them."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 1, size, size), generator=g).float() / 255.0


class TestHistogramEqualisation:
    def test_each_pixel_becomes_its_mid_rank_in_its_own_image(self) -> None:
        x = _levels()
        out = HistogramEqualisation()(x)
        for img, eq in zip(x, out, strict=True):
            values = np.rint(img.numpy().ravel() * 255).astype(int)
            below = np.array([(values < v).mean() for v in values])
            same = np.array([(values == v).mean() for v in values])
            np.testing.assert_allclose(eq.numpy().ravel(), below + same / 2, atol=1e-6)

    def test_increasing_maps_of_the_grey_values_give_the_same_image(self) -> None:
        """Gamma, window and gain (any increasing map that keeps levels apart) do not reach the output."""
        x = torch.arange(64, dtype=torch.float32).view(1, 1, 8, 8) / 255.0 * 3  # 64 distinct levels, 3 apart
        eq = HistogramEqualisation()
        for mapped in (x ** 0.8, 0.1 + 1.2 * x, 1.0 - (1.0 - x) ** 1.2):  # each keeps the 64 levels apart
            levels = torch.round(mapped * 255) / 255  # stored as display values again
            assert torch.equal(eq(levels), eq(x))
        assert not torch.equal(eq(x), x)

    def test_constant_image_and_output_range(self) -> None:
        eq = HistogramEqualisation()
        assert torch.equal(eq(torch.full((1, 1, 8, 8), 0.3)), torch.full((1, 1, 8, 8), 0.5))
        out = eq(torch.rand(3, 1, 32, 32))
        assert float(out.min()) > 0.0 and float(out.max()) < 1.0
        assert out.mean(dim=(1, 2, 3)).sub(0.5).abs().max() < 1e-3  # mid-ranks average to 1/2

    def test_the_traced_graph_equals_the_eager_path_bit_for_bit(self) -> None:
        """Sites compute features eagerly (bucketize); exports trace the comparisons: the same numbers."""
        eq = HistogramEqualisation()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(eq, _levels(2))
        for x in (_levels(3, seed=1), torch.rand(5, 1, 16, 16), torch.rand(2, 1, 16, 16) ** 3):
            assert torch.equal(traced(x), eq(x))

    def test_no_state_in_the_state_dict(self) -> None:
        assert HistogramEqualisation().state_dict() == {}
        with pytest.raises(ValueError, match="2 grey levels"):
            HistogramEqualisation(levels=1)


class TestInTheModel:
    def test_default_scatternet_equalises_in_its_fixed_front_end(self) -> None:
        model = build_model("scatternet", num_outputs=1, image_size=32)
        frontend, head, prefix = split_features(model)
        assert frontend is model.frontend and isinstance(frontend.standardise, HistogramEqualisation)
        assert frontend.cache_spec(32).startswith("eq256-") and list(model.state_dict()) == [
            "head.classifier.weight", "head.classifier.bias"]
        plain = build_model("scatternet", num_outputs=1, image_size=32, intensity="none")
        assert plain.frontend.standardise is None and plain.frontend.cache_spec(32) == plain.scattering.cache_spec(32)
        x = _levels(2, size=32)
        with torch.no_grad():
            torch.testing.assert_close(frontend(x), plain.frontend(HistogramEqualisation()(x)))
            torch.testing.assert_close(frontend(x ** 2.2), frontend(x), atol=0.05, rtol=0.0)  # nearly invariant
            assert not torch.allclose(plain.frontend(x ** 2.2), plain.frontend(x), atol=0.05)

    def test_onnx_export_holds_the_equalisation_and_matches_torch(self, tmp_path) -> None:
        torch.manual_seed(0)
        model = build_model("scatternet", num_outputs=1, image_size=32)
        with torch.no_grad():
            model.head.classifier.weight.normal_(0, 0.05)
        sample = torch.cat([_levels(4, size=32), torch.rand(2, 1, 32, 32) ** 2.5])
        report = export_onnx(model, tmp_path / "m.onnx", task="binary", labels=["opacity"], input_size=(32, 32),
                             threshold=0.5, sample_batch=sample,
                             metadata={"model": "scatternet", "rounds": "1", "sites": "[]", "epsilon": "{}"})
        assert report.max_abs_diff <= 1e-5
        ops = {node.op_type for node in onnx.load(str(tmp_path / "m.onnx")).graph.node}
        assert {"GreaterOrEqual", "GatherElements"} <= ops
        with torch.no_grad():
            expected = torch.sigmoid(model(sample)).numpy()
        np.testing.assert_allclose(load_onnx_model(tmp_path / "m.onnx").predict(sample.numpy()), expected, atol=1e-5)
