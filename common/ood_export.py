"""The image check's score in the exported model: a second output beside ``probabilities``.

ONNX (common/onnx_export.py): the graph gets the output ``ood_score`` float32 [N] (dynamic N),
computed from the same input with the reference mean and spread baked in as constants; the
cut-off and how it was set are in the ``fedxray.ood`` metadata (common/ood.py). Input ``image``,
output ``probabilities`` and every other ``fedxray.*`` prop stay as they were: a runtime that
knows nothing of the gate runs the file as before.

TorchScript (common/torchscript_export.py): ``forward`` still returns the probabilities; the
score is a second traced method, ``module.ood_score(image)`` (libtorch: ``get_method("ood_score")``).

The front end is shared, not copied: the model and the score are deep-copied together, so the
scattering filters appear once in the file.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn

from common.ood import OUTPUT as OOD_OUTPUT

__all__ = ["OOD_OUTPUT", "OOD_TOLERANCE", "TracedWithOod", "WithOod", "copy_with_ood", "ood_difference"]

# Relative tolerance of the score between runtimes: float32 sums of ~32 squared terms after a log
# of means keep ~1e-6 relative error; 1e-3 leaves room for other op orders and is far below what
# moves a decision (cut-offs are around 10, typical chest images score about 1).
OOD_TOLERANCE = 1e-3


class WithOod(nn.Module):
    """``forward(image) -> (probabilities, ood_score)`` for the ONNX export; ``probabilities`` and
    ``ood_score`` as separate methods for the TorchScript trace."""

    def __init__(self, probability_model: nn.Module, ood: nn.Module) -> None:
        super().__init__()
        self.probability_model = probability_model
        self.ood = ood

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.probability_model(image), self.ood(image)

    def probabilities(self, image: torch.Tensor) -> torch.Tensor:
        return self.probability_model(image)

    def ood_score(self, image: torch.Tensor) -> torch.Tensor:
        return self.ood(image)


class TracedWithOod(WithOod):
    """The TorchScript form: ``forward`` returns the probabilities only (the model's contract), the
    score is the traced method ``ood_score``."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.probability_model(image)


def copy_with_ood(model: nn.Module, ood: nn.Module | None) -> tuple[nn.Module, nn.Module | None]:
    """CPU eval-mode copies of ``model`` and ``ood`` that still share the modules they shared."""
    model_copy, ood_copy = copy.deepcopy((model, ood))  # one deepcopy: shared submodules stay shared
    model_copy = model_copy.to("cpu").eval()
    return model_copy, (ood_copy.to("cpu").eval() if ood_copy is not None else None)


def ood_difference(expected: NDArray[np.float32] | torch.Tensor, got: NDArray[np.float32]) -> float:
    """Largest |got - expected| / max(1, |expected|) over a batch (inf on a shape mismatch or NaN)."""
    e = np.asarray(expected.detach().numpy() if isinstance(expected, torch.Tensor) else expected, dtype=np.float64)
    g = np.asarray(got, dtype=np.float64)
    if e.shape != g.shape:
        return float("inf")
    worst = float(np.max(np.abs(g - e) / np.maximum(1.0, np.abs(e)))) if e.size else 0.0
    return worst if worst == worst else float("inf")
