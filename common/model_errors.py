"""The errors of the model builders (common/models.py re-exports them), in a module of their own
so the ScatterNet (common/scatter_net.py) and weights loading (common/model_weights.py) raise the
same classes as the builder without importing it."""

from __future__ import annotations


class ModelError(ValueError):
    """A model was asked for with an unknown name or bad arguments."""


class WeightsError(ValueError):
    """A weights file could not be read or does not fit the requested architecture."""
