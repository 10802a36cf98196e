"""Loading a local weights file into a model built by :func:`common.models.build_model`.

Moved out of common/models.py (which re-exports every name). Tensors are matched by key and
shape; torchvision ImageNet weights load by name (the RGB first conv summed to one channel).
Never downloads anything.
"""

from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from common.model_errors import WeightsError

log = logging.getLogger("common.models")  # the builder's logger name, as before the module was split

# Key of the first convolution's weight (the one that takes the image) per architecture.
_FIRST_CONV_KEY: dict[str, str] = {
    "densenet121": "features.conv0.weight",
    "mobilenet_v2": "features.0.0.weight",
}


def load_weights(model: nn.Module, name: str, weights_path: str | os.PathLike[str]) -> None:
    """Load what fits from a local weights file into ``model`` (built by :func:`build_model`).

    Tensors are matched by key and shape; a 3-channel first conv is summed over its input
    channels. Everything skipped is logged in one line. Never downloads anything.
    """
    path = Path(weights_path)
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, EOFError, RuntimeError, ValueError, pickle.UnpicklingError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise WeightsError(
            f"cannot read weights file {path} for model {name!r}: {reason}; expected a "
            "torch.save'd state_dict of tensors (arbitrary pickles are never loaded)"
        ) from err
    if isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping):
        raise WeightsError(
            f"weights file {path} holds a {type(loaded).__name__}, expected a state_dict "
            f"(dict of name -> tensor) for model {name!r}"
        )
    source = {_strip_wrapper_prefix(str(k)): v for k, v in loaded.items()}
    target = model.state_dict()
    first_conv = _FIRST_CONV_KEY.get(name, "")

    fitting: dict[str, torch.Tensor] = {}
    skipped: list[str] = []
    for key, tensor in source.items():
        if not isinstance(tensor, torch.Tensor) or key not in target:
            skipped.append(key)
            continue
        want = target[key].shape
        if key == first_conv and tensor.dim() == 4 and tensor.shape[1] == 3 and want[1] == 1:
            tensor = tensor.sum(dim=1, keepdim=True)  # RGB filters -> one grey filter
        if tensor.shape != want:
            skipped.append(f"{key} {tuple(tensor.shape)}!={tuple(want)}")
            continue
        fitting[key] = tensor
    if not fitting:
        raise WeightsError(
            f"nothing in weights file {path} fits model {name!r} "
            f"(first keys there: {', '.join(list(source)[:3]) or 'none'}); expected a "
            f"state_dict of {name} as built by common.models.build_model or torchvision"
        )
    missing = [k for k in target if k not in fitting]
    model.load_state_dict(fitting, strict=False)
    if skipped or missing:
        log.warning(
            "weights %s -> %s: loaded %d of %d tensors; skipped %d from the file (%s); "
            "left at initial values %d (%s)",
            path.name, name, len(fitting), len(target), len(skipped), _few(skipped),
            len(missing), _few(missing),
        )
    else:
        log.info("weights %s -> %s: loaded all %d tensors", path.name, name, len(fitting))


def _strip_wrapper_prefix(key: str) -> str:
    """Drop Opacus' ``_module.`` and DDP's ``module.`` prefixes."""
    for prefix in ("_module.", "module."):
        while key.startswith(prefix):
            key = key[len(prefix):]
    return key


def _few(keys: list[str], limit: int = 4) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... {len(keys) - limit} more" if len(keys) > limit else "") or "none"
