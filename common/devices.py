"""Which device training and scoring run on: what was asked, what this machine has, and a line saying so.

Sites are GPU machines in many hospitals, and CPU-only VMs in others. ``--device`` is ``auto``
(a GPU when there is one), ``cpu`` or ``cuda``. Asking for ``cuda`` where there is none is not an
error that should stop a hospital's round or a clinic's scoring: it runs on the CPU, and says so
in one warning line naming what is missing and how to fix it. The device actually used is what
callers log, never silently another one.

torch decides for training (``torch.cuda.is_available()``); onnxruntime for scoring (its CUDA
execution provider exists only in the ``onnxruntime-gpu`` build).
"""

from __future__ import annotations

import functools
import logging

from common.config import DEVICE_CHOICES

CPU_PROVIDER = "CPUExecutionProvider"
CUDA_PROVIDER = "CUDAExecutionProvider"

logger = logging.getLogger(__name__)


class DeviceError(ValueError):
    """An unknown device name (the message lists the choices)."""


def _check(requested: str) -> str:
    name = str(requested).strip().lower()
    if name not in DEVICE_CHOICES:
        raise DeviceError(f"device {requested!r} is not one of {', '.join(DEVICE_CHOICES)}")
    return name


@functools.cache
def _warn_once(message: str) -> None:
    logger.warning(message)


def torch_device(requested: str = "auto"):  # -> torch.device
    """The torch device for ``requested``: CUDA only when torch sees a GPU, else the CPU with a warning for ``cuda``."""
    import torch

    name = _check(requested)
    if name != "cpu" and torch.cuda.is_available():
        return torch.device("cuda")
    if name == "cuda":
        _warn_once(
            "device cuda was asked for but torch sees no CUDA GPU (check the NVIDIA driver with nvidia-smi, "
            "CUDA_VISIBLE_DEVICES, and that this torch build has CUDA): training on the CPU"
        )
    return torch.device("cpu")


def onnx_providers(requested: str = "auto") -> list[str]:
    """onnxruntime execution providers for ``requested``: CUDA first when this onnxruntime has it, CPU always."""
    import onnxruntime as ort

    name = _check(requested)
    if name != "cpu" and CUDA_PROVIDER in ort.get_available_providers():
        return [CUDA_PROVIDER, CPU_PROVIDER]
    if name == "cuda":
        _warn_once(
            "device cuda was asked for but this onnxruntime has no CUDA provider (install onnxruntime-gpu "
            "matching your CUDA version in place of onnxruntime): scoring on the CPU"
        )
    return [CPU_PROVIDER]


def describe_providers(session) -> str:  # session: onnxruntime.InferenceSession
    """'cuda' or 'cpu': where onnxruntime actually placed ``session`` (its first provider)."""
    providers = session.get_providers()
    return "cuda" if providers and providers[0] == CUDA_PROVIDER else "cpu"
