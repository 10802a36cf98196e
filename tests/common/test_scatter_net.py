"""common.scatter_net: the linear head's read-out (pooling, border mask), its DP closed form, export and heatmap."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from common.dp import dp_step, make_private, unwrapped_state_dict
from common.losses import criterion_for
from common.models import build_model, split_features
from common.onnx_export import export_onnx
from common.scatter_net import border_mask


@pytest.fixture(autouse=True, scope="module")
def _threads(one_torch_thread: None) -> None:
    """One torch thread (tests/conftest.py)."""


def _model(pool: int = 2, border: float = 0.125, size: int = 64) -> nn.Module:
    torch.manual_seed(0)
    model = build_model("scatternet", num_outputs=1, image_size=size, pool=pool, border=border)
    with torch.no_grad():
        model.head.classifier.weight.normal_(0.0, 0.05)
    return model


class TestReadOut:
    def test_pooled_and_masked_cells_are_what_the_classifier_reads(self) -> None:
        model = _model()
        head = model.head
        assert head.classifier.in_features == 81 * 8 * 8 and list(model.state_dict()) == [
            "head.classifier.weight", "head.classifier.bias"]
        x = torch.rand(3, 81, 16, 16)
        normed, squared = head.normed(x)
        expected = nn.functional.avg_pool2d(head.norm(x), 2) * border_mask((8, 8), 0.125).float()
        torch.testing.assert_close(normed, expected)
        torch.testing.assert_close(squared, expected.flatten(1).square().sum(1))
        with torch.no_grad():
            torch.testing.assert_close(head(x), head.classifier(expected.flatten(1)))
            # The weights of masked cells carry no evidence: changing them changes no output.
            before = head(x)
            grid = head.classifier.weight.view(1, 81, 8, 8)
            grid[:, :, 0, :] = 5.0
            grid[:, :, :, -1] = -5.0
            torch.testing.assert_close(head(x), before)

    def test_border_is_a_share_of_the_image(self) -> None:
        assert border_mask((16, 16), 0.125).sum() == 12 * 12 and border_mask((8, 8), 0.125).sum() == 6 * 6
        assert border_mask((16, 16), 0.0).all()
        assert build_model("scatternet", num_outputs=1).head.mask is None  # the default reads every cell

    @pytest.mark.parametrize("clip", [1e-3, 100.0])
    def test_closed_form_dp_step_equals_opacus_hooks(self, clip: float) -> None:
        """The closed form uses the head's fixed map (pooling and mask included) as Opacus' hooks see it."""
        head = _model().head
        x = torch.rand(9, 81, 16, 16)
        y = torch.randint(0, 2, (9, 1)).float()
        out = {}
        for closed in (True, False):
            h = build_model("scatternet", num_outputs=1, pool=2, border=0.125).head
            h.load_state_dict(head.state_dict())
            pt = make_private(h, torch.optim.SGD(h.parameters(), lr=0.5), DataLoader(TensorDataset(x, y), batch_size=9),
                              noise_multiplier=0.0, max_grad_norm=clip, mode="hooks", criterion=criterion_for("binary"))
            dp_step(pt, x, y, closed_form=closed)
            out[closed] = unwrapped_state_dict(pt)
        for k in out[True]:
            torch.testing.assert_close(out[True][k], out[False][k], rtol=1e-4, atol=1e-7)
        assert not torch.allclose(out[True]["classifier.weight"], head.state_dict()["classifier.weight"])


def test_export_and_the_clinics_exact_map_see_the_read_out(tmp_path) -> None:
    from clinic.heatmap import Explainer

    model = _model()
    sample = torch.rand(4, 1, 64, 64)
    report = export_onnx(model, tmp_path / "m.onnx", task="binary", labels=["opacity"], input_size=(64, 64),
                         threshold=0.5, sample_batch=sample,
                         metadata={"model": "scatternet", "rounds": "1", "sites": "[]", "epsilon": "{}"})
    assert report.max_abs_diff <= 1e-5
    assert "AveragePool" in {n.op_type for n in onnx.load(str(tmp_path / "m.onnx")).graph.node}
    explainer = Explainer((tmp_path / "m.onnx").read_bytes(), "binary")
    assert explainer.method == "linear-head"
    probs, attribution = explainer.explain(sample[:1].numpy(), 0)
    assert attribution.shape == (8, 8)
    assert np.all(attribution[0, :] == 0) and np.all(attribution[:, -1] == 0) and np.abs(attribution[1:-1, 1:-1]).sum() > 0
    frontend, head, _ = split_features(model)
    with torch.no_grad():
        logit = float(head(frontend(sample[:1]))[0, 0])
    assert attribution.sum(dtype=np.float64) + float(model.head.classifier.bias[0]) == pytest.approx(logit, abs=1e-4)
