"""Platt scaling from pooled score histograms: probabilities a hospital can read, not only rank.

DP-SGD with a large learning rate leaves a confident head: logits beyond +-17, where float32
sigmoid is exactly 0 or 1. In the study 26-72% of held-out images got a probability of exactly 0
or 1, so the exported model could no longer rank them (AUC 0.945 instead of 0.957 at epsilon 1)
and its threshold sat at 0.99-1.0. A monotone map ``sigmoid(a * logit + b)`` fitted on validation
data fixes both without changing the ranking of unsaturated scores. The coordinator has no scores,
only the sites' (noised) validation histograms, so the fit treats every image of a bin as lying
at the bin's logit midpoint (the two open end bins one half bin beyond the last edge). It is
post-processing of what the sites released: no privacy cost.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn


class CalibrationError(ValueError):
    """No calibration can be fitted from these histograms (a class is empty)."""


def bin_logits(edges: Sequence[float]) -> np.ndarray:
    """One representative logit per histogram bin: midpoints in logit space, open ends half a bin out."""
    e = np.asarray(edges, dtype=np.float64)
    inner = np.log(e[1:-1] / (1 - e[1:-1]))
    step = float(np.median(np.diff(inner))) if inner.size > 1 else 1.0
    mids = (inner[:-1] + inner[1:]) / 2.0
    return np.concatenate([[inner[0] - step / 2.0], mids, [inner[-1] + step / 2.0]])


def fit_platt(pos: Sequence[float], neg: Sequence[float], edges: Sequence[float]) -> tuple[float, float]:
    """(a, b) minimising the binomial deviance of ``sigmoid(a * z + b)`` over the bins.

    Searched on a grid, then refined: ``a`` in [0.01, 1] (the map only ever softens the model,
    never sharpens it, and stays increasing: the ranking does not change), ``b`` in [-8, 8].
    Bounded on purpose: with few, noised counts the unbounded maximum-likelihood fit can run off
    to infinity (separable bins); a bounded fit cannot.
    """
    p = np.clip(np.asarray(pos, dtype=np.float64), 0.0, None)
    n = np.clip(np.asarray(neg, dtype=np.float64), 0.0, None)
    if p.sum() <= 0 or n.sum() <= 0:
        raise CalibrationError("both classes are needed in the validation histograms to calibrate")
    z = bin_logits(edges)

    def deviance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        t = a[..., None] * z + b[..., None]
        return (p * np.logaddexp(0.0, -t) + n * np.logaddexp(0.0, t)).sum(axis=-1)

    a_grid, b_grid = np.meshgrid(np.logspace(-2, 0, 61), np.linspace(-8, 8, 161), indexing="ij")
    i, j = np.unravel_index(np.argmin(deviance(a_grid, b_grid)), a_grid.shape)
    a0, b0 = float(a_grid[i, j]), float(b_grid[i, j])
    fine_a, fine_b = np.meshgrid(np.clip(a0 * np.logspace(-0.04, 0.04, 41), 0.01, 1.0),
                                 np.clip(b0 + np.linspace(-0.1, 0.1, 41), -8, 8), indexing="ij")
    k, m = np.unravel_index(np.argmin(deviance(fine_a, fine_b)), fine_a.shape)
    return float(fine_a[k, m]), float(fine_b[k, m])


def calibrated_threshold(threshold: float, a: float, b: float) -> float:
    """The raw model's decision threshold expressed on the calibrated probabilities."""
    t = min(max(threshold, 1e-12), 1 - 1e-12)
    return 1.0 / (1.0 + math.exp(-(a * math.log(t / (1 - t)) + b)))


class Calibrated(nn.Module):
    """``model``'s logits mapped by ``a * logit + b`` (plain floats: constants in the ONNX graph)."""

    def __init__(self, model: nn.Module, a: float, b: float) -> None:
        super().__init__()
        self.model = model
        self.a, self.b = float(a), float(b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x) * self.a + self.b
