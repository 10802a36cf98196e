"""Losses per task, one value per image so that DP-SGD clips and counts images, not labels.

Multiclass: cross-entropy over the softmax. Binary and multilabel: independent sigmoids, binary
cross-entropy per finding, averaged over the findings known for the image. A NaN target is a
masked finding (uncertain or blank under an ``ignore`` policy, or a finding the site does not
label; common/labels.py): it adds nothing to the loss or its gradient. Without NaNs the value is
that of ``BCEWithLogitsLoss`` (the mean over all elements).

Rare findings: ``pos_weight`` multiplies each finding's positive term (``BCEWithLogitsLoss``'s
``pos_weight``). It comes from the run config (``pos-weight``), fixed by the coordinator for every
site: a site never derives it from its own label counts, which under DP are not accounted for. The
loss stays one value per image, so DP-SGD's clipping and accounting are unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class MaskedBCEWithLogitsLoss(nn.Module):
    """BCE on logits over each image's known findings; ``reduction`` none gives [N] (what Opacus' ghost clipping sets)."""

    def __init__(self, reduction: str = "mean", pos_weight: Sequence[float] = ()) -> None:
        super().__init__()
        self.reduction = reduction
        self.pos_weight = tuple(float(w) for w in pos_weight)  # one per output (last axis); () for none

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        known = ~torch.isnan(target)
        safe = torch.where(known, target, torch.zeros_like(target))
        weight = torch.as_tensor(self.pos_weight, dtype=logits.dtype, device=logits.device) if self.pos_weight else None
        per_element = F.binary_cross_entropy_with_logits(logits, safe, reduction="none", pos_weight=weight) * known
        if per_element.dim() > 1:
            per_sample = per_element.flatten(1).sum(1) / known.flatten(1).sum(1).clamp(min=1)
        else:
            per_sample = per_element
        if self.reduction == "none":
            return per_sample
        if self.reduction == "sum":
            return per_sample.sum()
        return per_sample.mean()


def criterion_for(task: str, pos_weight: Sequence[float] = ()) -> nn.Module:
    """Softmax cross-entropy for multiclass; independent sigmoids (masked BCE, ``pos_weight`` per output) otherwise."""
    if task == "multiclass":
        if pos_weight:
            raise ValueError("pos-weight weighs sigmoid outputs (binary, multilabel); a multiclass task takes none")
        return nn.CrossEntropyLoss()
    return MaskedBCEWithLogitsLoss(pos_weight=pos_weight)
