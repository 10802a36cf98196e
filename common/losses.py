"""Losses per task, one value per image so that DP-SGD clips and counts images, not labels.

Multiclass: cross-entropy over the softmax. Binary and multilabel: independent sigmoids, binary
cross-entropy per finding, averaged over the findings known for the image. A NaN target is a
masked finding (uncertain or blank under an ``ignore`` policy, or a finding the site does not
label; common/labels.py): it adds nothing to the loss or its gradient. Without NaNs the value is
that of ``BCEWithLogitsLoss`` (the mean over all elements).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MaskedBCEWithLogitsLoss(nn.Module):
    """BCE on logits over each image's known findings; ``reduction`` none gives [N] (what Opacus' ghost clipping sets)."""

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = reduction

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        known = ~torch.isnan(target)
        safe = torch.where(known, target, torch.zeros_like(target))
        per_element = F.binary_cross_entropy_with_logits(logits, safe, reduction="none") * known
        if per_element.dim() > 1:
            per_sample = per_element.flatten(1).sum(1) / known.flatten(1).sum(1).clamp(min=1)
        else:
            per_sample = per_element
        if self.reduction == "none":
            return per_sample
        if self.reduction == "sum":
            return per_sample.sum()
        return per_sample.mean()


def criterion_for(task: str) -> nn.Module:
    """Softmax cross-entropy for multiclass; independent sigmoids (masked BCE) for binary and multilabel."""
    return nn.CrossEntropyLoss() if task == "multiclass" else MaskedBCEWithLogitsLoss()
