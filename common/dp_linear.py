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

**Several views per image** (augmentation multiplicity, common/views.py): an image's loss is the
mean of its K views' losses, so its gradient is ``sum_k g_k h_k^T`` with ``g_k`` the gradient of
that mean at view k's logits (1/K included), and the squared norm of it (weight and bias) is
``sum_{k,l} (g_k . g_l) (h_k . h_l + 1)``. That per-image gradient is clipped once: one image still
moves the sum by at most C, so sampling, noise and accounting are those of one view. The views'
inputs ``h`` and their Gram matrices ``h_k . h_l`` do not change during a round; :class:`PreparedViews`
computes them once, and each step reads the rows it samples (:func:`closed_form_views_step`).
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
    return _noise_and_step(optimizer, layer, g, losses)


def _noise_and_step(optimizer: DPOptimizer, layer: nn.Linear, g: torch.Tensor, losses: torch.Tensor) -> float:
    """Opacus' own second half of a step, after the clipped sums are in ``summed_grad``; the mean loss."""
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


class PreparedViews:
    """The classifier inputs of K views of every training image, and their Gram matrices, for one round.

    ``h`` float32 [n, K, D] (the fixed map of each view's features, flattened), ``gram`` [n, K, K]
    (``h_k . h_l``). Both are computed once per round (:meth:`build`), in chunks; a step then reads
    the rows of the images it sampled.
    """

    def __init__(self, h: torch.Tensor, gram: torch.Tensor) -> None:
        self.h, self.gram = h, gram

    def __len__(self) -> int:
        return int(self.h.shape[0])

    def to(self, device: torch.device | str) -> PreparedViews:
        return PreparedViews(self.h.to(device), self.gram.to(device))

    def rows(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(h, gram) of the images ``idx``: a slice (no copy) when they are consecutive, as a full batch in order is."""
        if len(idx) > 1 and bool((idx[1:] - idx[:-1] == 1).all()):
            first, last = int(idx[0]), int(idx[-1]) + 1
            return self.h[first:last], self.gram[first:last]
        return self.h[idx], self.gram[idx]

    def linear(self, layer: nn.Linear, idx: torch.Tensor) -> torch.Tensor:
        """Logits [len(idx), K, outputs] of ``layer`` on the images' views, with autograd (training without DP)."""
        return F.linear(self.rows(idx)[0], layer.weight, layer.bias)

    @classmethod
    def build(cls, fixed_map: Callable, views: object, chunk: int = 128) -> PreparedViews:
        """From a :class:`common.views.FeatureViews` (its ``gather``) and the head's fixed map."""
        n = len(views)  # type: ignore[arg-type]
        h: torch.Tensor | None = None
        gram: torch.Tensor | None = None
        with torch.no_grad():
            for start in range(0, n, chunk):
                x = views.gather(range(start, min(n, start + chunk)))  # type: ignore[attr-defined]
                b, k = x.shape[:2]
                mapped = fixed_map(x.flatten(0, 1))
                rows = torch.flatten(mapped[0] if isinstance(mapped, tuple) else mapped, 1).view(b, k, -1)
                if h is None:
                    h = torch.empty((n, k, rows.shape[-1]), dtype=torch.float32)
                    gram = torch.empty((n, k, k), dtype=torch.float32)
                h[start:start + b] = rows
                gram[start:start + b] = rows @ rows.transpose(1, 2)  # type: ignore[index]
        if h is None or gram is None:
            raise ValueError("no training images to prepare views of")
        return cls(h, gram)


def closed_form_views_step(optimizer: DPOptimizer, prepared: PreparedViews, layer: nn.Linear,
                           per_sample_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                           idx: torch.Tensor, y: torch.Tensor, chunk: int = 512) -> float:
    """One DP-SGD step on the images ``idx`` (non-empty), each image's gradient the mean over its views, clipped once.

    Processed in chunks of ``chunk`` images whose clipped sums add up before the step's one noise draw.
    """
    k = prepared.h.shape[1]
    sum_w = torch.zeros_like(layer.weight)
    sum_b = torch.zeros_like(layer.bias)
    all_losses, all_g = [], []
    for start in range(0, len(idx), chunk):
        h, gram = prepared.rows(idx[start:start + chunk])  # consecutive images (all, at sample rate 1): no copy
        target = y[start:start + chunk]
        with torch.no_grad():
            logits = F.linear(h, layer.weight, layer.bias)  # [b, K, C]
        logits.requires_grad_(True)
        per_view = per_sample_loss(logits.flatten(0, 1), target.repeat_interleave(k, dim=0))
        losses = per_view.view(-1, k).mean(dim=1)  # the image's loss: the mean over its views
        (g,) = torch.autograd.grad(losses.sum(), logits)  # [b, K, C], the 1/K included
        with torch.no_grad():
            squared = torch.einsum("bkc,blc,bkl->b", g, g, gram + 1.0)
            factor = (optimizer.max_grad_norm / (squared.clamp(min=0.0).sqrt() + 1e-6)).clamp(max=1.0)
            clipped = (g * factor[:, None, None]).flatten(0, 1)  # [b*K, C]
            sum_w += clipped.t() @ h.flatten(0, 1)
            sum_b += clipped.sum(dim=0)
        all_losses.append(losses.detach())
        all_g.append(g.detach()[:, 0])
    layer.weight.summed_grad = sum_w
    layer.bias.summed_grad = sum_b
    return _noise_and_step(optimizer, layer, torch.cat(all_g), torch.cat(all_losses))
