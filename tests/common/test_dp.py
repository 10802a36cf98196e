"""Tests for common.dp: one DP-SGD step in every mode, clipping, conv per-sample routines."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from float32_tolerance import sum_tolerance
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from common.dp import (
    PerSampleLoss,
    PrivateTrainingError,
    conv_grad_sample,
    conv_norm_sample,
    dp_step,
    make_private,
    unwrapped_state_dict,
)
from common.models import TORCHVISION_NAMES, DPConv2d, build_model, grad_sample_mode

PX = 32
# Opacus hooks the first conv, whose input (the image) needs no gradient; torch says so.
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")


@pytest.fixture(autouse=True, scope="module")
def _threads(one_torch_thread: None) -> None:
    """Every test here on one torch thread (see tests/conftest.py)."""


def _private(
    name: str, mode: str, *, n: int = 4, noise: float = 1.0, clip: float = 1.0, lr: float = 0.1,
    train_part: str = "all",
):
    torch.manual_seed(0)
    model = build_model(name, num_outputs=3, dp=True, train_part=train_part)
    keys = list(model.state_dict())
    x = torch.rand(n, 1, PX, PX)
    y = torch.randint(0, 2, (n, 3)).float()
    loader = DataLoader(TensorDataset(x, y), batch_size=n)
    pt = make_private(
        model, torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr), loader,
        noise_multiplier=noise, max_grad_norm=clip, mode=mode,
        criterion=nn.BCEWithLogitsLoss(),
    )
    return pt, keys, x, y


def _distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return torch.sqrt(sum(((a[k] - b[k]) ** 2).sum() for k in a if a[k].is_floating_point()))


class TestDpStep:
    @pytest.mark.parametrize("name", TORCHVISION_NAMES)
    def test_chosen_mode_trains_and_keeps_original_keys(self, name: str) -> None:
        pt, keys, x, y = _private(name, grad_sample_mode(name), n=2)
        before = unwrapped_state_dict(pt)
        loss = dp_step(pt, x, y)
        after = unwrapped_state_dict(pt)
        assert list(after) == keys  # Flower sees the original keys, no `_module.`
        assert loss == pytest.approx(loss) and loss > 0  # finite
        assert all(not torch.equal(before[k], after[k]) for k in keys)

    @pytest.mark.parametrize("mode", ["hooks", "functorch", "ghost", "ew"])
    def test_every_mode_runs_on_mobilenet(self, mode: str) -> None:
        pt, keys, x, y = _private("mobilenet_v2", mode)
        before = unwrapped_state_dict(pt)
        dp_step(pt, x, y)
        assert _distance(before, unwrapped_state_dict(pt)) > 0
        assert pt.mode == mode

    @pytest.mark.parametrize("mode", ["hooks", "functorch", "ghost"])
    def test_empty_poisson_batch_still_adds_noise(self, mode: str) -> None:
        pt, _, x, y = _private("mobilenet_v2", mode)
        before = unwrapped_state_dict(pt)
        steps = len(pt.engine.accountant.history)
        loss = dp_step(pt, x[:0], y[:0])
        assert loss != loss  # NaN: no samples, no loss
        assert _distance(before, unwrapped_state_dict(pt)) > 0
        assert len(pt.engine.accountant.history) >= steps  # the step is accounted

    @pytest.mark.parametrize(
        ("name", "mode"),
        [(n, m) for n in TORCHVISION_NAMES for m in ("hooks", "ghost")],
    )
    def test_one_sample_update_is_clipped_to_the_bound(self, name: str, mode: str) -> None:
        # No noise, one sample, SGD: the update is lr * the clipped gradient, whose norm is
        # exactly max_grad_norm when the raw gradient is larger. Wrong per-sample norms
        # (too small or too large) move it off the bound.
        clip, lr = 1e-3, 1.0
        pt, _, x, y = _private(name, mode, n=1, noise=0.0, clip=clip, lr=lr)
        before = unwrapped_state_dict(pt)
        dp_step(pt, x, y)
        assert _distance(before, unwrapped_state_dict(pt)) == pytest.approx(lr * clip, rel=1e-3)

    @pytest.mark.parametrize(
        ("name", "mode"),
        [(n, m) for n in TORCHVISION_NAMES for m in ("hooks", "ghost")],
    )
    def test_fine_tuning_clips_the_trained_part_and_leaves_the_rest(self, name: str, mode: str) -> None:
        # DP fine-tuning (train-part last-block) takes ghost clipping (common.models.grad_sample_mode):
        # the trained part's one-sample update must sit on the clipping bound, the frozen part not move.
        clip, lr = 1e-3, 1.0
        pt, _, x, y = _private(name, mode, n=1, noise=0.0, clip=clip, lr=lr, train_part="last-block")
        trained = {k.removeprefix("_module.") for k, p in pt.model.named_parameters() if p.requires_grad}
        before = unwrapped_state_dict(pt)
        dp_step(pt, x, y)
        after = unwrapped_state_dict(pt)
        assert _distance({k: before[k] for k in trained}, {k: after[k] for k in trained}) == pytest.approx(
            lr * clip, rel=1e-3)
        frozen = [k for k in before if k not in trained and before[k].is_floating_point()]
        assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)

    @pytest.mark.parametrize("name", TORCHVISION_NAMES)
    def test_fine_tuning_takes_ghost_clipping_and_an_empty_batch_still_adds_noise(self, name: str) -> None:
        mode = grad_sample_mode(name, "last-block")
        assert mode == "ghost" and grad_sample_mode(name) == "hooks"
        pt, _, x, y = _private(name, mode, train_part="last-block")
        before = unwrapped_state_dict(pt)
        assert dp_step(pt, x[:0], y[:0]) != dp_step(pt, x[:0], y[:0])  # NaN losses: no samples
        assert _distance(before, unwrapped_state_dict(pt)) > 0

    def test_unknown_mode_and_bad_bounds_are_refused(self) -> None:
        model = build_model("mobilenet_v2", num_outputs=1)
        loader = DataLoader(TensorDataset(torch.rand(2, 1, PX, PX), torch.rand(2, 1)))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        kwargs = dict(criterion=nn.BCEWithLogitsLoss(), noise_multiplier=1.0)
        with pytest.raises(PrivateTrainingError, match="hooks, functorch, ew, ghost"):
            make_private(model, optimizer, loader, max_grad_norm=1.0, mode="fast", **kwargs)
        with pytest.raises(PrivateTrainingError, match="max_grad_norm"):
            make_private(model, optimizer, loader, max_grad_norm=0.0, mode="hooks", **kwargs)


class TestPerSampleLoss:
    def test_multilabel_loss_is_reduced_per_sample(self) -> None:
        out, y = torch.randn(4, 3), torch.randint(0, 2, (4, 3)).float()
        plain = nn.BCEWithLogitsLoss()
        loss = PerSampleLoss(plain)
        torch.testing.assert_close(loss(out, y), plain(out, y))
        loss.reduction = "none"
        assert loss(out, y).shape == (4,)
        assert plain.reduction == "mean"  # the caller's criterion is untouched

    def test_class_index_targets(self) -> None:
        out, y = torch.randn(5, 4), torch.randint(0, 4, (5,))
        torch.testing.assert_close(
            PerSampleLoss(nn.CrossEntropyLoss())(out, y), nn.CrossEntropyLoss()(out, y)
        )


CONVS = {
    "depthwise": dict(in_channels=8, out_channels=8, kernel_size=3, padding=1, groups=8),
    "depthwise_stride2": dict(
        in_channels=6, out_channels=6, kernel_size=3, stride=2, padding=1, groups=6
    ),
    "pointwise": dict(in_channels=6, out_channels=4, kernel_size=1),
    "pointwise_stride2": dict(in_channels=6, out_channels=4, kernel_size=1, stride=2),
    "grouped_dilated": dict(
        in_channels=8, out_channels=4, kernel_size=3, padding=2, dilation=2, groups=2
    ),
    "stem_7x7": dict(in_channels=1, out_channels=4, kernel_size=7, stride=2, padding=3),
    "deep_1x1_few_positions": dict(in_channels=64, out_channels=32, kernel_size=1),  # ghost norm
}


class TestConvSamplers:
    @pytest.mark.parametrize("config", list(CONVS))
    @pytest.mark.parametrize("size", [4, 9])
    def test_match_autograd_one_sample_at_a_time(self, config: str, size: int) -> None:
        torch.manual_seed(0)
        conv = DPConv2d(**CONVS[config], bias=True)
        x = torch.randn(3, conv.in_channels, size, size)
        grad_out = torch.randn_like(conv(x))
        reference = []
        for i in range(3):
            conv.zero_grad()
            (conv(x[i : i + 1]) * grad_out[i : i + 1]).sum().backward()
            reference.append((conv.weight.grad.clone(), conv.bias.grad.clone()))
        samples = conv_grad_sample(conv, [x], grad_out)
        norms = conv_norm_sample(conv, [x], grad_out)
        for i, (weight_grad, bias_grad) in enumerate(reference):
            torch.testing.assert_close(samples[conv.weight][i], weight_grad, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(samples[conv.bias][i], bias_grad, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(
                norms[conv.weight][i], weight_grad.norm(), rtol=1e-4, atol=1e-5
            )
            torch.testing.assert_close(norms[conv.bias][i], bias_grad.norm(), rtol=1e-4, atol=1e-5)


class TestPhysicalBatches:
    """A Poisson batch larger than one pass holds goes through in chunks: same step, one noise draw."""

    @staticmethod
    def _linear_step(physical: int, *, noise: float) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = nn.Linear(6, 1)
        x, y = torch.randn(10, 6), torch.randint(0, 2, (10, 1)).float()
        pt = make_private(model, torch.optim.SGD(model.parameters(), lr=0.5), DataLoader(TensorDataset(x, y), batch_size=10),
                          noise_multiplier=noise, max_grad_norm=0.1, mode="hooks", criterion=nn.BCEWithLogitsLoss())
        dp_step(pt, x, y, physical_batch=physical)
        return unwrapped_state_dict(pt)

    def test_chunked_step_equals_one_pass_without_noise(self) -> None:
        whole = self._linear_step(10, noise=0.0)
        chunked = self._linear_step(3, noise=0.0)  # 4 chunks of 3, 3, 2, 2
        # The chunks sum the 10 clipped per-sample gradients in another order; each came through a logit and
        # a norm of 6 + 1 terms. A step is at most lr * clip = 0.05; the weights themselves are O(1).
        tol = sum_tolerance(10 + 2 * 7, 0.5 * 0.1) + sum_tolerance(1, max(float(v.abs().max()) for v in whole.values()))
        for k in whole:
            torch.testing.assert_close(chunked[k], whole[k], rtol=0, atol=tol)

    def test_chunked_step_is_accounted_once_and_noised(self) -> None:
        torch.manual_seed(0)
        model = nn.Linear(6, 1)
        x, y = torch.randn(10, 6), torch.randint(0, 2, (10, 1)).float()
        pt = make_private(model, torch.optim.SGD(model.parameters(), lr=0.5), DataLoader(TensorDataset(x, y), batch_size=10),
                          noise_multiplier=1.0, max_grad_norm=0.1, mode="hooks", criterion=nn.BCEWithLogitsLoss())
        dp_step(pt, x, y, physical_batch=4)
        (noise, rate, steps), = pt.engine.accountant.history
        assert steps == 1 and noise == 1.0
        no_noise = self._linear_step(10, noise=0.0)
        assert any(not torch.allclose(unwrapped_state_dict(pt)[k], no_noise[k]) for k in no_noise)


class TestClosedFormLinearHead:
    """The ScatterNet's linear head takes common.dp_linear's closed form: the same step as Opacus' hooks."""

    @staticmethod
    def _head_step(*, closed_form: bool, task: str, clip: float, noise: float = 0.0, n: int = 12,
                   reorder: bool = False):
        """Two DP steps of the head; ``reorder`` shuffles the positions within each channel (and the classifier's
        columns with them): the same numbers summed in another order, as another CPU's vector width sums them.
        Returns (weights in the natural order, the losses, the private training, the weights before the steps)."""
        from common.losses import criterion_for

        torch.manual_seed(0)
        model = build_model("scatternet", num_outputs=3 if task == "multiclass" else 2, image_size=PX, dp=True)
        head = model.head
        nn.init.normal_(head.classifier.weight, std=0.05)  # away from the zero start, so the gradients differ
        shape = (n, model.scattering.out_channels, *model.scattering.out_size)
        x = torch.rand(shape)
        y = torch.randint(0, 3, (n,)) if task == "multiclass" else torch.randint(0, 2, (n, 2)).float()
        start = {k: v.clone() for k, v in head.state_dict().items()}
        positions = shape[2] * shape[3]
        order = torch.randperm(positions, generator=torch.Generator().manual_seed(1)) if reorder else torch.arange(positions)
        # GroupNorm's statistics and the classifier do not care in which order the positions within a channel come.
        x = x.flatten(2)[:, :, order].view(shape)
        with torch.no_grad():
            weight = head.classifier.weight
            weight.copy_(weight.view(weight.shape[0], shape[1], positions)[:, :, order].flatten(1))
        opt = torch.optim.SGD(head.parameters(), lr=0.5, momentum=0.9)
        pt = make_private(head, opt, DataLoader(TensorDataset(x, y), batch_size=n), noise_multiplier=noise,
                          max_grad_norm=clip, mode=grad_sample_mode("scatternet"), criterion=criterion_for(task))
        losses = [dp_step(pt, x, y, closed_form=closed_form) for _ in range(2)]  # two steps: momentum too
        weights = unwrapped_state_dict(pt)
        trained = weights["classifier.weight"].view(-1, shape[1], positions)
        weights["classifier.weight"] = torch.empty_like(trained).index_copy_(2, order, trained).flatten(1)
        return weights, losses, pt, start

    @pytest.mark.parametrize("task", ["multilabel", "multiclass"])
    @pytest.mark.parametrize("clip", [1e-3, 100.0])  # every sample clipped / none clipped
    @pytest.mark.parametrize("reorder", [False, True])  # this CPU's summation order / another's
    def test_equals_opacus_per_sample_clipped_sum(self, task: str, clip: float, reorder: bool) -> None:
        from common.dp_linear import linear_parts

        fast, fast_losses, pt, start = self._head_step(closed_form=True, task=task, clip=clip, reorder=reorder)
        assert linear_parts(pt.model._module, pt.optimizer) is not None  # the closed form, not the hooks, ran
        hooks, hook_losses, _, _ = self._head_step(closed_form=False, task=task, clip=clip)
        assert set(fast) == set(hooks)
        # Both paths sum the same float32 numbers in another order. Each step's entry comes through a sum of
        # D + 1 terms (the logits), one of D terms (|h|^2, for the clipping factor) and one over the n samples;
        # the error is relative to the step itself, plus the rounding of adding it to the weight (two steps).
        # A hard-coded atol (1e-7) held on one CPU and failed on another.
        d, n = pt.model._module.classifier.in_features, 12
        for k in hooks:
            step = (hooks[k] - start[k]).abs().max()
            tol = sum_tolerance(2 * (d + 1) + n, step) + sum_tolerance(2, hooks[k].abs().max())
            torch.testing.assert_close(fast[k] - start[k], hooks[k] - start[k], rtol=0, atol=tol)
        # The mean loss: logits (sums of D + 1 terms) through the loss, averaged over n samples.
        assert fast_losses == pytest.approx(hook_losses, rel=sum_tolerance(d + 1 + n, 1.0))
        assert any(not torch.allclose(fast[k], start[k]) for k in fast)  # the step moved the weights

    def test_noised_and_accounted_like_opacus(self) -> None:
        quiet, _, _, _ = self._head_step(closed_form=True, task="multilabel", clip=1.0)
        noisy, _, pt, _ = self._head_step(closed_form=True, task="multilabel", clip=1.0, noise=1.0)
        assert [tuple(h) for h in pt.engine.accountant.history] == [(1.0, 1.0, 2)]  # two steps of sigma 1, rate 1
        diff = (noisy["classifier.weight"] - quiet["classifier.weight"]).flatten()
        # Two noise draws of std sigma*C / batch each, through SGD with momentum 0.9: std 0.5 * (1.9^2 + 1)^0.5 / 12.
        expected = 0.5 * (1.9**2 + 1) ** 0.5 / 12
        assert float(diff.std()) == pytest.approx(expected, rel=0.1)


class TestViewsClosedForm:
    """Augmentation multiplicity: an image's K views give one per-sample gradient, their mean, clipped once."""

    N, K = 7, 3

    @staticmethod
    def _setup(task: str, seed: int = 0):
        from common.losses import criterion_for
        from common.views import FeatureViews

        torch.manual_seed(seed)
        model = build_model("scatternet", num_outputs=3 if task == "multiclass" else 2, image_size=PX, dp=True)
        nn.init.normal_(model.head.classifier.weight, std=0.05)
        shape = (TestViewsClosedForm.N, TestViewsClosedForm.K, model.frontend.out_channels, *model.frontend.out_size)
        x = torch.rand(shape)
        n = TestViewsClosedForm.N
        y = torch.randint(0, 3, (n,)) if task == "multiclass" else torch.randint(0, 2, (n, 2)).float()
        views = FeatureViews(x[:, 0].numpy(), x[:, 1:].numpy().astype(np.float16), y.numpy())
        return model.head, views, y, criterion_for(task)

    def _views_step(self, head, views, y, crit, *, clip: float, noise: float = 0.0, idx=None):
        import copy

        from common.dp import dp_views_step
        from common.dp_linear import PreparedViews

        head = copy.deepcopy(head)
        opt = torch.optim.SGD(head.parameters(), lr=0.5)
        n = len(views)
        pt = make_private(head, opt, DataLoader(TensorDataset(torch.arange(n), y), batch_size=n), noise_multiplier=noise,
                          max_grad_norm=clip, mode=grad_sample_mode("scatternet"), criterion=crit)
        prepared = PreparedViews.build(head.linear_parts()[0], views)
        idx = torch.arange(n) if idx is None else idx
        loss = dp_views_step(pt, prepared, idx, y[idx])
        return unwrapped_state_dict(pt), loss, pt

    @pytest.mark.parametrize("task", ["multilabel", "multiclass"])
    @pytest.mark.parametrize("clip", [1e-3, 100.0])  # every image clipped / none clipped
    def test_each_image_gives_the_clipped_mean_of_its_views_gradients(self, task: str, clip: float) -> None:
        """Against an independent computation: autograd one image at a time, the mean loss of its views."""
        head, views, y, crit = self._setup(task)
        ours, loss, _ = self._views_step(head, views, y, crit, clip=clip)
        x = views.gather(range(self.N))
        total = {k: torch.zeros_like(p) for k, p in head.named_parameters()}
        losses = []
        for i in range(self.N):
            head.zero_grad()
            target = y[i:i + 1].repeat_interleave(self.K, dim=0)
            per_view = crit.__class__(reduction="none")(head(x[i]), target)
            image_loss = (per_view.mean(dim=1) if per_view.dim() > 1 else per_view).mean()
            image_loss.backward()
            losses.append(float(image_loss.detach()))
            norm = torch.sqrt(sum((p.grad ** 2).sum() for p in head.parameters()))
            factor = min(1.0, clip / (float(norm) + 1e-6))
            for k, p in head.named_parameters():
                total[k] += factor * p.grad
        assert loss == pytest.approx(float(np.mean(losses)), rel=1e-5)
        for k, p in head.named_parameters():
            expected = p.detach() - 0.5 * total[k] / self.N  # SGD, no noise, mean over the expected batch
            # float32 sums of 21 view products in two orders: a few 1e-8 apart near 0 (weights are ~0.05).
            torch.testing.assert_close(ours[k], expected, rtol=1e-4, atol=1e-7)
            assert not torch.allclose(ours[k], p.detach())

    def test_equals_opacus_hooks_with_the_views_as_an_extra_axis(self) -> None:
        """Opacus' own per-sample gradient of a linear layer sums over extra input axes; with each image's
        loss the mean over its views that is the mean gradient: the closed form must give Opacus' step."""
        import copy

        head, views, y, crit = self._setup("multilabel", seed=1)
        ours, _, _ = self._views_step(head, views, y, crit, clip=0.02)

        class ViewsHead(nn.Module):
            def __init__(self, h: nn.Module) -> None:
                super().__init__()
                self.h = h

            def forward(self, x: torch.Tensor) -> torch.Tensor:  # [n, K, C, h, w] -> [n, K, outputs]
                normed, _ = self.h.normed(x.flatten(0, 1))
                return self.h.classifier(normed.flatten(1).view(x.shape[0], x.shape[1], -1))

        wrapped = ViewsHead(copy.deepcopy(head))
        x = views.gather(range(self.N))
        opt = torch.optim.SGD(wrapped.parameters(), lr=0.5)
        pt = make_private(wrapped, opt, DataLoader(TensorDataset(x, y), batch_size=self.N), noise_multiplier=0.0,
                          max_grad_norm=0.02, mode="hooks", criterion=crit)
        dp_step(pt, x, y[:, None, :].expand(-1, self.K, -1), closed_form=False)
        opacus = unwrapped_state_dict(pt)
        for k in ours:
            torch.testing.assert_close(ours[k], opacus[f"h.{k}"], rtol=1e-4, atol=1e-7)

    def test_noise_sampling_and_accounting_are_those_of_one_view(self) -> None:
        head, views, y, crit = self._setup("multilabel")
        quiet, _, _ = self._views_step(head, views, y, crit, clip=1.0)
        noisy, _, pt = self._views_step(head, views, y, crit, clip=1.0, noise=1.0)
        assert [tuple(h) for h in pt.engine.accountant.history] == [(1.0, 1.0, 1)]  # one step, sigma 1, rate 1
        diff = (noisy["classifier.weight"] - quiet["classifier.weight"]).flatten()
        assert float(diff.std()) == pytest.approx(0.5 * 1.0 / self.N, rel=0.1)  # lr * sigma * C / batch
        empty, loss, pt = self._views_step(head, views, y, crit, clip=1.0, noise=1.0, idx=torch.arange(0))
        assert np.isnan(loss) and len(pt.engine.accountant.history) == 1
        assert not torch.equal(empty["classifier.weight"], head.state_dict()["classifier.weight"])  # noised all the same
