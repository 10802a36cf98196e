"""An exponential moving average of the global weights over rounds: the model the coordinator evaluates and exports.

Under DP every round's global model carries the sites' fresh noise. Averaging the models of the
last rounds keeps their common signal and averages their independent noise down (De et al.,
2022, "parameter averaging"); it touches nothing but weights the sites already released, so it is
post-processing and costs no privacy. The average, not the last round's weights, is then what the
sites evaluate (the pooled AUC, threshold and calibration of a round are those of the average), what
``export-round`` picks from and what goes into model.onnx; training goes on from each round's own
global model, so the average changes nothing the sites do.

``average_{1} = w_1`` and ``average_r = decay * average_{r-1} + (1 - decay) * w_r``; ``decay`` 0 is
no averaging (the average is the last round's model). Its state (the round it covers and the
weights) is part of the strategy state that every checkpoint keeps, so a resumed run continues the
same average.
"""

from __future__ import annotations

from typing import Any

import numpy as np


class WeightAverage:
    """The running average; :meth:`update` once per aggregated round, in round order."""

    def __init__(self, decay: float, state: dict[str, Any] | None = None) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"weight-average decay {decay} must be in [0, 1)")
        self.decay = float(decay)
        self.rounds = 0
        self.weights: dict[str, np.ndarray] = {}
        if state:
            self.rounds = int(state.get("rounds", 0))
            self.weights = {k: np.asarray(v) for k, v in dict(state.get("weights", {})).items()}

    @property
    def active(self) -> bool:
        return self.decay > 0.0

    def update(self, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Fold in the newest global weights; returns the average (float tensors averaged, others as given)."""
        if not self.weights or set(self.weights) != set(weights):
            self.weights = {k: np.array(v, copy=True) for k, v in weights.items()}
        else:
            d = self.decay
            self.weights = {k: (d * self.weights[k] + (1.0 - d) * v).astype(v.dtype) if v.dtype.kind == "f"
                            else np.array(v, copy=True) for k, v in weights.items()}
        self.rounds += 1
        return self.weights

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps (plain numpy arrays and an int)."""
        return {"rounds": self.rounds, "weights": {k: np.asarray(v) for k, v in self.weights.items()}}


def exported_weights(strategy_state: dict[str, Any], weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The weights to export and evaluate: the running average a checkpoint's strategy state holds, else ``weights``."""
    average = (strategy_state or {}).get("weight_average") or {}
    kept = average.get("weights") if isinstance(average, dict) else None
    return {k: np.asarray(v) for k, v in kept.items()} if kept else weights
