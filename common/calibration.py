"""Platt scaling from pooled score histograms: probabilities a hospital can read, not only rank.

DP-SGD with a large learning rate leaves a confident head: logits beyond +-17, where float32
sigmoid is exactly 0 or 1. In the study 26-72% of held-out images got a probability of exactly 0
or 1, so the exported model could no longer rank them (AUC 0.945 instead of 0.957 at epsilon 1)
and its threshold sat at 0.99-1.0. A monotone map ``sigmoid(a * logit + b)`` fitted on validation
data fixes both without changing the ranking of unsaturated scores. The coordinator has no scores,
only the sites' (noised) validation histograms, so the fit treats every image of a bin as lying
at the bin's logit midpoint (the two open end bins one half bin beyond the last edge), on the
pooled counts made consistent (non-negative, each class keeping its noised total). It is
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
    """(a, b) of Platt's fit of ``sigmoid(a * z + b)`` to the binned validation scores, without bounds.

    Platt (1999) with the refinement of Lin, Lin and Weng (2007): the targets are
    ``(N+ + 1) / (N+ + 2)`` for positives and ``1 / (N- + 2)`` for negatives instead of 1 and 0,
    so the likelihood always has one finite maximum, even when the noised bins separate the
    classes completely; Newton steps with a backtracking line search find it. No search box: a
    fit that needs a > 1 (an under-confident model) or a large shift gets it, where the earlier
    grid pinned it at its edge. Negative counts (noise) are taken as zero; pass consistent
    counts (common.pooled_metrics.consistent_counts). CalibrationError when a class is empty or
    the bins rank negatives above positives (a <= 0 would reverse the model's ranking).
    """
    p = np.clip(np.asarray(pos, dtype=np.float64), 0.0, None)
    n = np.clip(np.asarray(neg, dtype=np.float64), 0.0, None)
    if p.sum() <= 0 or n.sum() <= 0:
        raise CalibrationError("both classes are needed in the validation histograms to calibrate")
    z = bin_logits(edges)
    hi, lo = (p.sum() + 1.0) / (p.sum() + 2.0), 1.0 / (n.sum() + 2.0)
    weight = np.concatenate([p, n])
    target = np.concatenate([np.full(p.size, hi), np.full(n.size, lo)])
    zz = np.concatenate([z, z])

    def loss(a: float, b: float) -> float:
        t = a * zz + b
        return float(np.sum(weight * (target * np.logaddexp(0.0, -t) + (1.0 - target) * np.logaddexp(0.0, t))))

    a, b = 1.0, float(np.log((p.sum() + 1.0) / (n.sum() + 1.0)))
    current = loss(a, b)
    for _ in range(100):
        q = 0.5 * (1.0 + np.tanh((a * zz + b) / 2.0))  # the sigmoid, without overflow far out
        g = weight * (q - target)
        h = weight * q * (1.0 - q)
        grad = np.array([np.sum(g * zz), np.sum(g)])
        hess = np.array([[np.sum(h * zz * zz), np.sum(h * zz)], [np.sum(h * zz), np.sum(h)]]) + 1e-12 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        scale = 1.0
        while scale > 1e-10 and loss(a - scale * step[0], b - scale * step[1]) > current + 1e-4 * scale * float(grad @ step):
            scale /= 2.0
        a, b = a - scale * step[0], b - scale * step[1]
        previous, current = current, loss(a, b)
        if abs(previous - current) <= 1e-10 * max(1.0, abs(current)) and np.abs(grad).max() < 1e-6 * weight.sum():
            break
    if not (np.isfinite(a) and np.isfinite(b)) or a <= 0:
        raise CalibrationError(f"the validation bins do not rank positives above negatives (Platt slope {a:.3g}); "
                               "the model is not calibrated")
    return float(a), float(b)


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
