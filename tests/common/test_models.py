"""Tests for common.models: shapes, DP-readiness, weights loading, self-description.

Tiny inputs (32 px, batch 2-4) keep every test to seconds, DenseNet121 included.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from opacus.validators import ModuleValidator
from torch import nn
from torchvision import models as tvm

from common.models import (
    NORMALISATION,
    TORCHVISION_NAMES,
    DPConv2d,
    ModelError,
    WeightsError,
    build_model,
    count_parameters,
    describe,
    grad_sample_mode,
    group_norm_groups,
)

PX = 32


@pytest.fixture(autouse=True, scope="module")
def _threads(one_torch_thread: None) -> None:
    """Every test here on one torch thread (see tests/conftest.py)."""


@pytest.fixture(scope="module")
def models() -> dict[tuple[str, bool], nn.Module]:
    """One read-only model per (name, dp), 3 outputs; tests that train build their own."""
    torch.manual_seed(0)
    return {
        (name, dp): build_model(name, num_outputs=3, dp=dp).eval()
        for name in TORCHVISION_NAMES
        for dp in (True, False)
    }


class TestBuildModel:
    @pytest.mark.parametrize("name", TORCHVISION_NAMES)
    @pytest.mark.parametrize("dp", [True, False])
    @pytest.mark.parametrize("num_outputs", [1, 3])
    def test_output_shape_is_batch_by_outputs(
        self, name: str, dp: bool, num_outputs: int
    ) -> None:
        model = build_model(name, num_outputs=num_outputs, dp=dp).eval()
        with torch.no_grad():
            out = model(torch.rand(4, 1, PX, PX))
        assert out.shape == (4, num_outputs)
        assert torch.isfinite(out).all()

    @pytest.mark.parametrize("name", TORCHVISION_NAMES)
    @pytest.mark.parametrize("dp", [True, False])
    def test_server_and_client_builds_have_identical_keys(
        self, name: str, dp: bool, models: dict[tuple[str, bool], nn.Module]
    ) -> None:
        server = models[(name, dp)].state_dict()
        client = build_model(name, num_outputs=3, dp=dp).state_dict()
        assert list(server) == list(client)
        assert all(server[k].shape == client[k].shape for k in server)

    @pytest.mark.parametrize("name", TORCHVISION_NAMES)
    def test_keys_are_torchvision_keys(
        self, name: str, models: dict[tuple[str, bool], nn.Module]
    ) -> None:
        reference = getattr(tvm, name)(weights=None, num_classes=3).state_dict()
        assert list(models[(name, False)].state_dict()) == list(reference)

    @pytest.mark.parametrize("name", TORCHVISION_NAMES)
    def test_whole_unit_range_is_accepted(
        self, name: str, models: dict[tuple[str, bool], nn.Module]
    ) -> None:
        x = torch.stack([torch.zeros(1, PX, PX), torch.ones(1, PX, PX)])
        with torch.no_grad():
            out = models[(name, True)](x)
        assert torch.isfinite(out).all()
        assert not torch.equal(out[0], out[1])

    def test_rgb_or_unbatched_input_is_refused_with_the_fix(
        self, models: dict[tuple[str, bool], nn.Module]
    ) -> None:
        model = models[("mobilenet_v2", True)]
        with pytest.raises(ModelError, match=r"\[N, 1, H, W\]"):
            model(torch.rand(2, 3, PX, PX))
        with pytest.raises(ModelError, match="unsqueeze"):
            model(torch.rand(2, PX, PX))

    def test_normalisation_is_applied_inside_and_not_stored(
        self, models: dict[tuple[str, bool], nn.Module]
    ) -> None:
        model = models[("mobilenet_v2", True)]
        mean, std = NORMALISATION
        assert (model.mean, model.std) == (mean, std)
        assert list(model.buffers()) == []  # nothing travels besides the weights
        x = torch.rand(2, 1, PX, PX)
        with torch.no_grad():
            direct = model(x)
            model.mean, model.std = 0.0, 1.0  # feed pre-normalised input instead
            try:
                manual = model((x - mean) / std)
            finally:
                model.mean, model.std = mean, std
        torch.testing.assert_close(direct, manual)

    @pytest.mark.parametrize("bad", [0, -1, 2.0, True])
    def test_bad_num_outputs_is_refused(self, bad: object) -> None:
        with pytest.raises(ValueError, match="num_outputs"):
            build_model("mobilenet_v2", num_outputs=bad)  # type: ignore[arg-type]


class TestDpForm:
    @pytest.mark.parametrize("name", TORCHVISION_NAMES)
    def test_no_batchnorm_only_groupnorm(
        self, name: str, models: dict[tuple[str, bool], nn.Module]
    ) -> None:
        dp_modules = list(models[(name, True)].modules())
        assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in dp_modules)
        assert any(isinstance(m, nn.GroupNorm) for m in dp_modules)
        plain = list(models[(name, False)].modules())
        assert any(isinstance(m, nn.BatchNorm2d) for m in plain)

    @pytest.mark.parametrize("name", TORCHVISION_NAMES)
    def test_opacus_validator_finds_nothing(
        self, name: str, models: dict[tuple[str, bool], nn.Module]
    ) -> None:
        dp_model, plain = models[(name, True)], models[(name, False)]
        dp_model.train(), plain.train()  # Opacus validates models in training mode
        try:
            assert ModuleValidator.validate(dp_model, strict=False) == []
            ModuleValidator.validate(dp_model, strict=True)  # raises on any error
            assert ModuleValidator.validate(plain, strict=False) != []
        finally:
            dp_model.eval(), plain.eval()

    @pytest.mark.parametrize("name", TORCHVISION_NAMES)
    def test_nothing_in_place(self, name: str, models: dict[tuple[str, bool], nn.Module]) -> None:
        in_place = [
            n for n, m in models[(name, True)].named_modules() if getattr(m, "inplace", False)
        ]
        assert in_place == []

    @pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")
    @pytest.mark.parametrize("name", TORCHVISION_NAMES)
    def test_forward_has_no_inplace_op_under_backward_hooks(self, name: str) -> None:
        # The failure Opacus hooks hit with torchvision's forward: an in-place op on a
        # hooked module's output. Full backward hooks on every module reproduce it.
        model = build_model(name, num_outputs=1, dp=True)
        for module in model.modules():
            if not list(module.children()):
                module.register_full_backward_hook(lambda *_: None)
        model(torch.rand(2, 1, PX, PX)).sum().backward()
        assert all(p.grad is not None for p in model.parameters())

    @pytest.mark.parametrize("name", TORCHVISION_NAMES)
    def test_convolutions_are_dpconv2d(
        self, name: str, models: dict[tuple[str, bool], nn.Module]
    ) -> None:
        convs = [m for m in models[(name, True)].modules() if isinstance(m, nn.Conv2d)]
        assert convs and all(type(m) is DPConv2d for m in convs)
        plain = [m for m in models[(name, False)].modules() if isinstance(m, nn.Conv2d)]
        assert all(type(m) is nn.Conv2d for m in plain)

    def test_group_counts(self, models: dict[tuple[str, bool], nn.Module]) -> None:
        assert [group_norm_groups(c) for c in (16, 24, 32, 144, 1280)] == [16, 8, 32, 16, 32]
        norms = [m for m in models[("densenet121", True)].modules() if isinstance(m, nn.GroupNorm)]
        assert {m.num_groups for m in norms} == {32}


class TestWeights:
    @pytest.mark.parametrize(("name", "dp"), [(n, True) for n in TORCHVISION_NAMES] + [("mobilenet_v2", False)])
    def test_saved_state_dict_round_trips(self, name: str, dp: bool, tmp_path: Path) -> None:
        source = build_model(name, num_outputs=2, dp=dp)
        with torch.no_grad():  # make the stored values differ from any fresh init
            for p in source.parameters():
                p.add_(0.01 * torch.randn_like(p))
        source.eval()
        path = tmp_path / "weights.pt"
        torch.save(source.state_dict(), path)
        loaded = build_model(name, num_outputs=2, dp=dp, weights_path=path).eval()
        x = torch.rand(2, 1, PX, PX)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), source(x), rtol=0, atol=0)

    @pytest.mark.parametrize(("name", "first_conv"), [
        ("densenet121", "features.conv0.weight"),
        ("mobilenet_v2", "features.0.0.weight"),
    ])
    def test_torchvision_rgb_weights_load_with_first_conv_summed(
        self, name: str, first_conv: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        rgb = getattr(tvm, name)(weights=None).state_dict()  # 3 channels, 1000 classes
        path = tmp_path / "imagenet.pth"
        torch.save(rgb, path)
        with caplog.at_level(logging.WARNING, logger="common.models"):
            model = build_model(name, num_outputs=1, dp=True, weights_path=path)
        state = model.state_dict()
        torch.testing.assert_close(state[first_conv], rgb[first_conv].sum(dim=1, keepdim=True))
        norm_weight = next(k for k in state if k.endswith(".weight") and state[k].dim() == 1)
        torch.testing.assert_close(state[norm_weight], rgb[norm_weight])
        assert "running_mean" in caplog.text  # BatchNorm statistics skipped, and said so
        assert "classifier" in caplog.text  # 1000-class head skipped

    def test_opacus_wrapped_keys_load(self, tmp_path: Path) -> None:
        source = build_model("mobilenet_v2", num_outputs=1)
        path = tmp_path / "wrapped.pt"
        torch.save({f"_module.{k}": v for k, v in source.state_dict().items()}, path)
        loaded = build_model("mobilenet_v2", num_outputs=1, weights_path=path)
        for key, value in source.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], value)

    def test_other_architecture_is_refused(self, tmp_path: Path) -> None:
        path = tmp_path / "densenet.pt"
        torch.save(build_model("densenet121", num_outputs=1).state_dict(), path)
        with pytest.raises(WeightsError, match="nothing in weights file"):
            build_model("mobilenet_v2", num_outputs=1, weights_path=path)

    def test_unreadable_file_is_refused(self, tmp_path: Path) -> None:
        path = tmp_path / "broken.pt"
        path.write_bytes(b"not a torch file")
        with pytest.raises(WeightsError, match="cannot read weights file"):
            build_model("mobilenet_v2", num_outputs=1, weights_path=path)
        with pytest.raises(WeightsError):
            build_model("mobilenet_v2", num_outputs=1, weights_path=tmp_path / "missing.pt")


class TestNamesAndDescription:
    def test_unknown_name_lists_the_known_ones(self) -> None:
        for call in (
            lambda: build_model("resnet50", num_outputs=1),
            lambda: grad_sample_mode("resnet50"),
        ):
            with pytest.raises(ValueError) as info:
                call()
            assert all(name in str(info.value) for name in TORCHVISION_NAMES)

    @pytest.mark.parametrize("name", TORCHVISION_NAMES)
    def test_grad_sample_mode_is_an_opacus_mode(self, name: str) -> None:
        assert grad_sample_mode(name) in ("hooks", "functorch", "ew", "ghost")

    def test_count_parameters_counts_trainable_only(self) -> None:
        model = build_model("mobilenet_v2", num_outputs=1)
        total = sum(p.numel() for p in model.parameters())
        assert count_parameters(model) == total
        model.classifier.requires_grad_(False)
        assert count_parameters(model) == total - sum(
            p.numel() for p in model.classifier.parameters()
        )

    def test_describe(self) -> None:
        card = describe("mobilenet_v2", num_outputs=2)
        assert card["name"] == "mobilenet_v2"
        assert card["parameters"] == count_parameters(build_model("mobilenet_v2", num_outputs=2))
        assert card["grad_sample_mode"] == grad_sample_mode("mobilenet_v2")
        assert card["normalisation"] == {"mean": NORMALISATION[0], "std": NORMALISATION[1]}
