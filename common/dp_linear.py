"""DP-SGD for one linear layer on fixed inputs, with per-sample gradients in closed form.

The default DP model (ScatterNet, linear head) trains one ``nn.Linear`` on a fixed, parameter-free
map of cached features. Opacus' hooks then spend most of a step materialising an [N, out, in]
tensor of per-sample gradients, measuring and clipping it. For logits ``z_i = W h_i + b`` the
gradient of sample i's loss is ``g_i h_i^T`` for ``W`` and ``g_i`` for ``b`` (``g_i = dl_i/dz_i``),
so its L2 norm is ``|g_i| sqrt(|h_i|^2 + 1)`` and the clipped sum is ``(c * G)^T H`` with Opacus'
factor ``c_i = min(1, C / (norm_i + 1e-6))``: the same numbers, computed directly. Everything after
the clipped sum is Opacus' own ``DPOptimizer``: the Gaussian noise (``add_noise``, from the site's
generator), the division by the expected batch size (``scale_grad``), the accountant's step
(``step_hook``) and the wrapped optimizer's step. tests/common/test_dp.py checks the result
against Opacus' hooks.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from opacus.optimizers import DPOptimizer
from torch import nn

# The fixed map gives the classifier's input, or (input, its squared L2 norm per sample) when it knows them.
Parts = tuple[Callable[[torch.Tensor], "torch.Tensor | tuple[torch.Tensor, torch.Tensor]"], nn.Linear]


def linear_parts(module: nn.Module, optimizer: object) -> Parts | None:
    """(fixed input map, the only trained layer) when ``module`` trains one nn.Linear with a bias on a
    fixed map of its input (its ``linear_parts()`` says so) under Opacus' flat clipping; else None."""
    if type(optimizer) is not DPOptimizer or not hasattr(module, "linear_parts"):
        return None
    parts = module.linear_parts()
    if parts is None or parts[1].bias is None:
        return None
    if {id(p) for p in optimizer.params} != {id(p) for p in parts[1].parameters()}:
        return None
    return parts


def closed_form_step(optimizer: DPOptimizer, parts: Parts,
                     per_sample_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                     x: torch.Tensor, y: torch.Tensor) -> float:
    """One DP-SGD step (clip, sum, noise, scale, account, update) on a non-empty batch; returns the mean loss."""
    features, layer = parts
    with torch.no_grad():
        mapped = features(x)
        h, h_sq = mapped if isinstance(mapped, tuple) else (mapped, None)  # the map may know its squared norms
        h = torch.flatten(h, 1)
        if h_sq is None:
            h_sq = torch.linalg.vector_norm(h, dim=1).square_()
        logits = F.linear(h, layer.weight, layer.bias)
    logits.requires_grad_(True)
    losses = per_sample_loss(logits, y)
    (g,) = torch.autograd.grad(losses.sum(), logits)
    with torch.no_grad():
        norms = torch.linalg.vector_norm(g, dim=1) * (h_sq + 1.0).sqrt_()
        clipped = g * (optimizer.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)[:, None]
        layer.weight.summed_grad = (clipped.t() @ h).to(layer.weight.dtype)
        layer.bias.summed_grad = clipped.sum(dim=0).to(layer.bias.dtype)
    for p in (layer.weight, layer.bias):
        p.grad_sample = g  # a tensor (not a list): one accumulated batch, all that scale_grad and the accountant read
    optimizer.add_noise()
    optimizer.scale_grad()
    if optimizer.step_hook:
        optimizer.step_hook(optimizer)
    optimizer._is_last_step_skipped = False
    optimizer.original_optimizer.step()
    optimizer.zero_grad(set_to_none=True)  # no zero-filling: the next step sets every gradient afresh
    return float(losses.detach().mean())
