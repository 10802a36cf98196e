"""Losses per task (common/losses.py): masked findings add nothing, one loss per image for DP."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from common.dp import PerSampleLoss
from common.losses import MaskedBCEWithLogitsLoss, criterion_for


def test_equals_bce_without_masks():
    logits, y = torch.randn(5, 3), (torch.rand(5, 3) > 0.5).float()
    assert torch.allclose(MaskedBCEWithLogitsLoss()(logits, y), nn.BCEWithLogitsLoss()(logits, y))


def test_masked_findings_give_no_loss_and_no_gradient():
    logits = torch.zeros(2, 2, requires_grad=True)
    y = torch.tensor([[1.0, math.nan], [0.0, 1.0]])
    loss = MaskedBCEWithLogitsLoss(reduction="none")(logits, y)
    assert torch.allclose(loss, torch.full((2,), math.log(2.0)))  # per image: mean over its known findings
    loss.sum().backward()
    assert logits.grad[0, 1] == 0 and torch.isfinite(logits.grad).all()


def test_per_sample_for_dp():
    """PerSampleLoss (ghost clipping) gets [N] from the masked loss, as from every task's criterion."""
    y = torch.tensor([[1.0, math.nan, 0.0]] * 4)
    per_sample = PerSampleLoss(criterion_for("multilabel"), reduction="none")(torch.randn(4, 3), y)
    assert per_sample.shape == (4,) and torch.isfinite(per_sample).all()
    assert isinstance(criterion_for("multiclass"), nn.CrossEntropyLoss)


class TestPosWeight:
    def test_equals_bce_with_pos_weight_and_weighs_only_positives(self):
        logits, y = torch.randn(6, 3), (torch.rand(6, 3) > 0.5).float()
        w = (1.0, 4.0, 6.0)
        loss = criterion_for("multilabel", w)(logits, y)
        assert torch.allclose(loss, nn.BCEWithLogitsLoss(pos_weight=torch.tensor(w))(logits, y))
        negatives = torch.zeros(6, 3)
        assert torch.allclose(criterion_for("multilabel", w)(logits, negatives), criterion_for("multilabel")(logits, negatives))

    def test_masked_findings_stay_masked_and_one_loss_per_image(self):
        y = torch.tensor([[1.0, math.nan], [math.nan, 1.0]])
        loss = MaskedBCEWithLogitsLoss(reduction="none", pos_weight=(2.0, 5.0))(torch.zeros(2, 2), y)
        assert torch.allclose(loss, torch.tensor([2.0, 5.0]) * math.log(2.0))

    def test_multiclass_takes_none(self):
        with pytest.raises(ValueError, match="multiclass"):
            criterion_for("multiclass", (2.0, 1.0))
