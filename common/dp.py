"""One DP-SGD training step for every Opacus grad-sample mode.

Opacus computes per-sample gradients in several ways ("hooks", "functorch", "ew", "ghost"),
and which is fastest depends on the model (docs/models.md). Ghost clipping changes the
training step: ``make_private`` also returns a wrapped criterion whose ``loss.backward()``
runs two backward passes. :func:`make_private` and :func:`dp_step` hide that difference, so a
training loop does the same thing whatever ``common.models.grad_sample_mode`` picked.

Privacy accounting is not done here: the engine's RDP accountant records the steps, but the
site's privacy ledger (client side) is the source of truth for epsilon.
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from opacus import PrivacyEngine
from opacus.optimizers import DPOptimizer
from torch import nn
from torch.utils.data import DataLoader

log = logging.getLogger(__name__)

GRAD_SAMPLE_MODES: tuple[str, ...] = ("hooks", "functorch", "ew", "ghost")


class PrivateTrainingError(ValueError):
    """DP-SGD could not be set up with the given arguments."""


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

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        per_element = self.base(output, target)
        per_sample = per_element.flatten(1).mean(dim=1) if per_element.dim() > 1 else per_element
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
) -> PrivateTraining:
    """Wrap model, optimizer and loader for DP-SGD with Opacus in grad-sample ``mode``.

    ``optimizer`` must have been built on ``model.parameters()``. ``noise_multiplier`` is the
    Gaussian noise std relative to ``max_grad_norm`` (the per-sample L2 clipping bound).
    ``secure_mode=True`` needs the torchcsprng package (not a fedxray dependency).
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
    if not secure_mode:
        log.debug("DP noise from torch's default RNG (secure_mode off)")
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


def dp_step(pt: PrivateTraining, x: torch.Tensor, y: torch.Tensor) -> float:
    """One DP-SGD step on a batch: forward, loss, backward, clip+noise step; returns the loss.

    An empty batch (possible under Poisson sampling) still takes a step: the noise is added
    and the accountant counts it, as DP-SGD requires; the returned loss is then NaN.
    """
    pt.model.train()
    pt.optimizer.zero_grad()
    if x.shape[0] == 0 and pt.mode != "ghost":
        # functorch and ew cannot run a 0-sample forward; no samples means zero per-sample
        # gradients, so hand the optimizer exactly that and let it add the noise.
        for p in pt.optimizer.params:
            p.grad_sample = p.new_zeros((0, *p.shape))
        pt.optimizer.step()
        pt.optimizer.zero_grad()
        return float("nan")
    output = pt.model(x)
    loss = pt.criterion(output, y)
    loss.backward()
    pt.optimizer.step()
    value = float(loss.item())
    pt.optimizer.zero_grad()
    return value


def unwrapped_state_dict(pt: PrivateTraining) -> dict[str, torch.Tensor]:
    """The trained weights under the original model's keys (no Opacus ``_module.`` prefix).

    Returns detached CPU copies, so later training steps do not change what was returned.
    """
    module = getattr(pt.model, "_module", pt.model)
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}
