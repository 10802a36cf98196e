"""One DP-SGD training step for every Opacus grad-sample mode.

Opacus computes per-sample gradients in several ways ("hooks", "functorch", "ew", "ghost"),
and which is fastest depends on the model (docs/models.md). Ghost clipping changes the
training step: ``make_private`` also returns a wrapped criterion whose ``loss.backward()``
runs two backward passes. :func:`make_private` and :func:`dp_step` hide that difference, so a
training loop does the same thing whatever ``common.models.grad_sample_mode`` picked.

Importing this module also registers with Opacus faster per-sample gradient and gradient-norm
routines for ``common.models.DPConv2d`` (every convolution of the DP-ready models); see
:func:`conv_grad_sample` and docs/models.md for the figures.

Privacy accounting is not done here: the engine's RDP accountant records the steps, but the
site's privacy ledger (client side) is the source of truth for epsilon.
"""

from __future__ import annotations

import copy
import logging
import math
import secrets
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from opacus import PrivacyEngine
from opacus.grad_sample import register_grad_sampler, register_norm_sampler
from opacus.grad_sample.conv import compute_conv_grad_sample
from opacus.optimizers import DPOptimizer
from opacus.utils.tensor_utils import unfold2d
from torch import nn
from torch.utils.data import DataLoader

from common.dp_linear import PreparedViews, closed_form_step, closed_form_views_step, linear_parts
from common.models import DPConv2d

log = logging.getLogger(__name__)

GRAD_SAMPLE_MODES: tuple[str, ...] = ("hooks", "functorch", "ew", "ghost")


class PrivateTrainingError(ValueError):
    """DP-SGD could not be set up with the given arguments."""


def _conv_columns(
    layer: DPConv2d, activations: torch.Tensor, backprops: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group im2col views: inputs [N, G, I/G * kh * kw, L], grads [N, G, O/G, L].

    A 1x1 convolution needs no unfolding (a strided view of the input is its column matrix).
    """
    n, groups = activations.shape[0], layer.groups
    if layer.kernel_size == (1, 1) and layer.padding == (0, 0):
        sh, sw = layer.stride
        if (sh, sw) != (1, 1):
            activations = activations[:, :, ::sh, ::sw]
        cols = activations.reshape(n, groups, activations.shape[1] // groups, -1)
    else:
        cols = unfold2d(
            activations,
            kernel_size=layer.kernel_size,  # type: ignore[arg-type]
            padding=layer.padding,  # type: ignore[arg-type]
            stride=layer.stride,  # type: ignore[arg-type]
            dilation=layer.dilation,  # type: ignore[arg-type]
        )
        cols = cols.view(n, groups, -1, cols.shape[-1])
    grads = backprops.reshape(n, groups, layer.out_channels // groups, -1)
    return cols, grads


def _weight_grad_sample(
    layer: DPConv2d, activations: torch.Tensor, backprops: torch.Tensor
) -> torch.Tensor:
    """Per-sample weight gradients [N, *weight.shape].

    1x1: one matmul per sample and group. Larger kernels: the batch is folded into the
    channels (input [1, N*I, H, W], a convolution with N*G groups), whose ordinary weight
    gradient is the per-sample one; oneDNN/cuDNN compute it without an im2col copy, 2-7x
    faster than unfold + matmul for 3x3 layers (most of all depthwise ones).
    """
    n = activations.shape[0]
    if layer.kernel_size == (1, 1) and layer.padding == (0, 0):
        cols, grads = _conv_columns(layer, activations, backprops)
        return torch.matmul(grads, cols.transpose(-1, -2)).reshape(n, *layer.weight.shape)
    folded_input = activations.reshape(1, -1, *activations.shape[2:])
    folded_grad = backprops.reshape(1, -1, *backprops.shape[2:])
    # Only the shape of the weight matters when just the weight gradient is asked for.
    folded_weight = activations.new_empty((n * layer.out_channels, *layer.weight.shape[1:]))
    _, weight_grad, _ = torch.ops.aten.convolution_backward(
        folded_grad, folded_input, folded_weight, None,
        layer.stride, layer.padding, layer.dilation, False, [0, 0],
        n * layer.groups, [False, True, False],
    )
    return weight_grad.view(n, *layer.weight.shape)


def _fast_path(layer: DPConv2d, activations: torch.Tensor) -> bool:
    return (
        activations.shape[0] > 0
        and not isinstance(layer.padding, str)
        and layer.padding_mode == "zeros"
    )


def conv_grad_sample(
    layer: DPConv2d, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradients of a convolution (Opacus grad sampler for :class:`DPConv2d`).

    Same result as Opacus' ``compute_conv_grad_sample``, which multiplies every output channel
    with every input channel and then keeps the diagonal blocks: for a depthwise convolution
    with C channels that is C times the work needed.
    """
    a = activations[0].to(backprops.dtype)
    if not _fast_path(layer, a):
        return compute_conv_grad_sample(layer, activations, backprops)
    result: dict[nn.Parameter, torch.Tensor] = {}
    if layer.weight.requires_grad:
        result[layer.weight] = _weight_grad_sample(layer, a, backprops)
    if layer.bias is not None and layer.bias.requires_grad:
        result[layer.bias] = backprops.reshape(a.shape[0], layer.out_channels, -1).sum(dim=2)
    return result


def conv_norm_sample(
    layer: DPConv2d, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradient norms of a convolution (ghost clipping), without storing gradients.

    For one sample and group the weight gradient is B A^T (B: [O/G, L] output grads,
    A: [I/G*k, L] input columns, L output positions). Its squared norm is either computed
    from B A^T itself (O/G * I/G*k * L multiply-adds) or, the "ghost norm", as
    sum((A^T A) * (B^T B)) (L^2 * (I/G*k + O/G)); the cheaper one is used per layer. Deep
    layers at small image sizes have few positions and many weights, where the ghost norm
    saves most of the work.
    """
    a = activations[0].to(backprops.dtype)
    n = a.shape[0]
    if n == 0:
        return {p: a.new_zeros(0) for p in (layer.weight, layer.bias) if p is not None}
    if not _fast_path(layer, a):
        grads = compute_conv_grad_sample(layer, activations, backprops)
        return {p: g.reshape(n, -1).norm(dim=1) for p, g in grads.items()}
    result: dict[nn.Parameter, torch.Tensor] = {}
    if layer.weight.requires_grad:
        positions = backprops.shape[2] * backprops.shape[3]
        fan_out = layer.out_channels // layer.groups
        fan_in = layer.weight[0].numel()  # I/G * kh * kw
        if positions * (fan_in + fan_out) < fan_in * fan_out:
            cols, grads = _conv_columns(layer, a, backprops)
            gram_a = torch.matmul(cols.transpose(-1, -2), cols)  # [N, G, L, L]
            gram_b = torch.matmul(grads.transpose(-1, -2), grads)
            squared = (gram_a * gram_b).sum(dim=(1, 2, 3))
        else:
            squared = _weight_grad_sample(layer, a, backprops).reshape(n, -1).square().sum(1)
        result[layer.weight] = squared.clamp(min=0).sqrt()
    if layer.bias is not None and layer.bias.requires_grad:
        result[layer.bias] = backprops.reshape(n, layer.out_channels, -1).sum(dim=2).norm(dim=1)
    return result


# Opacus looks samplers up by exact module type, so this affects DPConv2d only.
register_grad_sampler(DPConv2d)(conv_grad_sample)
register_norm_sampler(DPConv2d)(conv_norm_sample)


class PerSampleLoss(nn.Module):
    """A loss reduced per sample first, then over the batch.

    Opacus' ghost clipping needs a loss of shape [N] when it sets ``reduction="none"``; a
    multilabel ``BCEWithLogitsLoss`` would give [N, C]. Averaging the non-batch axes per
    sample gives [N] for every task, and with ``reduction="mean"`` the same value as the
    plain loss (mean over all elements), so all modes train the same objective.
    """

    def __init__(self, criterion: nn.Module, reduction: str = "mean") -> None:
        super().__init__()
        if not hasattr(criterion, "reduction"):
            raise PrivateTrainingError(
                f"criterion {type(criterion).__name__} has no `reduction` attribute; expected a "
                "torch.nn loss module such as BCEWithLogitsLoss or CrossEntropyLoss"
            )
        self.base = copy.copy(criterion)  # the caller's criterion stays untouched
        self.base.reduction = "none"
        self.reduction = reduction

    def per_sample(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The loss of each sample, shape [N]."""
        per_element = self.base(output, target)
        return per_element.flatten(1).mean(dim=1) if per_element.dim() > 1 else per_element

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        per_sample = self.per_sample(output, target)
        if self.reduction == "none":
            return per_sample
        if self.reduction == "sum":
            return per_sample.sum()
        return per_sample.mean()


@dataclass
class PrivateTraining:
    """Everything a DP training loop needs, as returned by :func:`make_private`."""

    model: nn.Module  # Opacus wrapper around the caller's model (original under ._module)
    optimizer: DPOptimizer  # clips per-sample gradients and adds noise at step()
    data_loader: DataLoader  # Poisson-sampled unless poisson_sampling=False
    criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # call as criterion(out, y)
    engine: PrivacyEngine  # holds the RDP accountant of these steps
    mode: str  # Opacus grad_sample_mode in use


def make_private(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data_loader: DataLoader,
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    mode: str,
    criterion: nn.Module,
    secure_mode: bool = False,
    poisson_sampling: bool = True,
    generator: torch.Generator | None = None,
) -> PrivateTraining:
    """Wrap model, optimizer and loader for DP-SGD with Opacus in grad-sample ``mode``.

    ``optimizer`` must have been built on ``model.parameters()``. ``noise_multiplier`` is the
    Gaussian noise std relative to ``max_grad_norm`` (the per-sample L2 clipping bound).

    ``generator`` draws both the Poisson sampling and the Gaussian noise (use
    :func:`site_generator`: seeded from the operating system, so nobody outside the site, the
    coordinator included, can replay the noise and subtract it). Without it Opacus falls back
    to torch's global generator, which anyone who knows the seed reproduces.
    ``secure_mode=True`` needs the torchcsprng package (not a fedxray dependency; unmaintained).
    """
    if mode not in GRAD_SAMPLE_MODES:
        raise PrivateTrainingError(
            f"grad-sample mode {mode!r} is not supported; expected one of "
            f"{', '.join(GRAD_SAMPLE_MODES)} (see common.models.grad_sample_mode)"
        )
    if noise_multiplier < 0 or max_grad_norm <= 0:
        raise PrivateTrainingError(
            f"noise_multiplier={noise_multiplier}, max_grad_norm={max_grad_norm}; expected "
            "noise_multiplier >= 0 and max_grad_norm > 0"
        )
    with warnings.catch_warnings():
        # Opacus warns on every engine without secure RNG; say it once, in the log, instead.
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        engine = PrivacyEngine(accountant="rdp", secure_mode=secure_mode)
    noise_generator = None
    if generator is not None and not secure_mode:
        # Opacus' Poisson sampler takes the engine's "secure" generator; the noise its own.
        engine.secure_rng = generator
        noise_generator = generator
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        if device.type != "cpu":
            noise_generator = site_generator(device)
    elif not secure_mode:
        log.debug("DP noise from torch's default RNG (no site generator given)")
    loss = PerSampleLoss(criterion)
    wrapped = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=data_loader,
        criterion=loss,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        poisson_sampling=poisson_sampling,
        grad_sample_mode=mode,
        noise_generator=noise_generator,
    )
    if mode == "ghost":
        private_model, private_optimizer, private_criterion, private_loader = wrapped
    else:
        private_model, private_optimizer, private_loader = wrapped
        private_criterion = loss
    return PrivateTraining(
        model=private_model,
        optimizer=private_optimizer,
        data_loader=private_loader,
        criterion=private_criterion,
        engine=engine,
        mode=mode,
    )


def site_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator seeded with 63 bits from the operating system's CSPRNG (``secrets``).

    DP-SGD's guarantee assumes the noise is unknown to whoever sees the update. A seed taken
    from the run config (which the coordinator sets) would let the coordinator regenerate the
    exact noise and recover the clipped gradient sum; a fresh OS-random seed per round cannot
    be guessed. torch's generators are not cryptographic: docs/privacy.md states the residual
    risk (floating-point attacks on the Gaussian sampler, which Opacus' secure_mode addresses
    with torchcsprng, a package not built for current torch).
    """
    gen = torch.Generator(device=device)
    gen.manual_seed(secrets.randbits(63))
    return gen


#: Largest number of images one forward/backward pass holds; a larger Poisson batch (a big site
#: at a high sample rate) is split into such chunks whose clipped gradients add up before the one
#: noise draw of the step, so memory stays bounded and the privacy of the step is unchanged.
PHYSICAL_BATCH = 512


def dp_step(pt: PrivateTraining, x: torch.Tensor, y: torch.Tensor, *, physical_batch: int = PHYSICAL_BATCH,
            closed_form: bool = True) -> float:
    """One DP-SGD step on a batch: forward, loss, backward, clip+noise step; returns the loss.

    An empty batch (possible under Poisson sampling) still takes a step: the noise is added
    and the accountant counts it, as DP-SGD requires; the returned loss is then NaN.
    A batch over ``physical_batch`` images goes through in chunks (Opacus' skipped steps, as
    its BatchMemoryManager does): each chunk's per-sample gradients are clipped and summed,
    and only the last chunk adds the noise, scales by the expected batch and counts the step.
    A linear head on fixed features (the ScatterNet default) takes :func:`closed_form_step`
    instead of Opacus' hooks (``closed_form=False`` forces the hooks, e.g. to compare).
    """
    pt.model.train()
    if closed_form and x.shape[0] > 0 and pt.mode != "ghost" and isinstance(pt.criterion, PerSampleLoss):
        parts = linear_parts(getattr(pt.model, "_module", pt.model), pt.optimizer)
        if parts is not None:
            pt.optimizer.zero_grad(set_to_none=True)
            return closed_form_step(pt.optimizer, parts, pt.criterion.per_sample, x, y)
    pt.optimizer.zero_grad()
    if x.shape[0] == 0 and pt.mode != "ghost":
        # functorch and ew cannot run a 0-sample forward; no samples means zero per-sample
        # gradients, so hand the optimizer exactly that and let it add the noise.
        for p in pt.optimizer.params:
            p.grad_sample = p.new_zeros((0, *p.shape))
        pt.optimizer.step()
        pt.optimizer.zero_grad()
        return float("nan")
    chunks = max(1, math.ceil(x.shape[0] / physical_batch)) if pt.mode != "ghost" else 1
    total = 0.0
    for i, (xc, yc) in enumerate(zip(x.chunk(chunks), y.chunk(chunks))):
        output = pt.model(xc)
        loss = pt.criterion(output, yc)
        with warnings.catch_warnings():
            # Opacus' hooks on a first trainable layer whose input needs no gradient (a head on fixed
            # features, a frozen backbone) make torch warn on every backward; the gradients are right.
            warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed")
            loss.backward()
        pt.optimizer.signal_skip_step(do_skip=i < chunks - 1)
        pt.optimizer.step()
        total += float(loss.item()) * xc.shape[0]
        pt.optimizer.zero_grad()
    return total / x.shape[0] if x.shape[0] else float("nan")


def dp_views_step(pt: PrivateTraining, prepared: PreparedViews, idx: torch.Tensor, y: torch.Tensor) -> float:
    """One DP-SGD step over the images ``idx`` of ``prepared`` (K views each, common/views.py); returns the loss.

    Each image's gradient is the mean over its views, clipped once (common.dp_linear), so the step
    is private exactly like :func:`dp_step` on one view: the same sampling, clipping bound, noise and
    accounting. An empty Poisson batch still adds the noise and counts the step. Only the linear
    head on fixed features (the ScatterNet default) trains on views.
    """
    pt.model.train()
    parts = linear_parts(getattr(pt.model, "_module", pt.model), pt.optimizer) if pt.mode != "ghost" else None
    if parts is None or not isinstance(pt.criterion, PerSampleLoss):
        raise PrivateTrainingError("training on several views per image needs the ScatterNet's linear head on "
                                   "fixed features (head = linear, grad-sample mode hooks); set views = 1 for other models")
    pt.optimizer.zero_grad(set_to_none=True)
    if idx.shape[0] == 0:
        for p in pt.optimizer.params:
            p.grad_sample = p.new_zeros((0, *p.shape))
        pt.optimizer.step()
        pt.optimizer.zero_grad()
        return float("nan")
    return closed_form_views_step(pt.optimizer, prepared, parts[1], pt.criterion.per_sample, idx, y)


def unwrapped_state_dict(pt: PrivateTraining) -> dict[str, torch.Tensor]:
    """The trained weights under the original model's keys (no Opacus ``_module.`` prefix).

    Returns detached CPU copies, so later training steps do not change what was returned.
    """
    module = getattr(pt.model, "_module", pt.model)
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}
