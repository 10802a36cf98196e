"""Acquisition changes no site trained on, rendered onto a radiograph: the conditions of the shift benchmark.

A federated model meets hospitals it never saw: other display curves and windows, other bit
depths, MONOCHROME1 storage, sharper or softer detectors, more noise, lower resolution, other
positioning. Each condition below renders one such change onto a display image (float [H, W] in
[0, 1], as ``common.preprocess.load_pixels`` gives it) at the image's own resolution, before the
resize to the model's input size (common.preprocess.to_model_input), as a scanner would produce it. The storage conditions
(``window-lung``, ``bits-6``, ``mono1``) really write a DICOM file through
``simulations.acquisition.write_radiograph`` and read it back with the site's reader.

Sizes in pixels (blur, sharpening) and the noise level are given for a 64-px image and scaled with
the image's width, so a condition does about the same to the model input whatever the resolution
it is rendered at (the hold-out at the source's 224 px, a site's cached 64-px image).

The severities were fixed before any model was scored on them. ``in_view_recipe`` says whether the
change lies inside the ranges of the training views (common/views.py): those conditions test
interpolation, the others extrapolation.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Condition:
    name: str
    kind: str
    amount: float
    what: str  # one line for tables
    in_view_recipe: bool = False


CONDITIONS: tuple[Condition, ...] = (
    Condition("clean", "none", 0.0, "the held-out image as stored by the source"),
    Condition("gamma-0.5", "gamma", 0.5, "display curve gamma 0.5 (brighter mid-tones)"),
    Condition("gamma-2.0", "gamma", 2.0, "display curve gamma 2.0 (darker mid-tones)"),
    Condition("contrast-0.6", "contrast", 0.6, "contrast 0.6 about the image mean (flat processing)"),
    Condition("window-lung", "window", 0.6, "DICOM VOI window over the middle 60% of the stored range (tails clipped)"),
    Condition("bits-6", "bits", 6.0, "stored with 6 significant bits (64 grey levels), read by min-max"),
    Condition("mono1", "mono1", 12.0, "stored as 12-bit MONOCHROME1 (inverted) and read back"),
    Condition("blur-1.5", "blur", 1.5, "Gaussian blur sigma 1.5 px at 64 px (a softer detector)", in_view_recipe=True),
    Condition("sharpen-1.0", "sharpen", 1.0, "unsharp mask, amount 1, sigma 1 px at 64 px (edge enhancement)"),
    Condition("noise-0.02", "noise", 0.02, "Gaussian noise, std 0.02 of the display range at 64 px"),
    Condition("lowres-32", "lowres", 32.0, "acquired at 32 px across, upsampled (bilinear)"),
    Condition("rotate-5", "rotate", 5.0, "patient rotated by 5 degrees", in_view_recipe=True),
    Condition("crop-0.9", "crop", 0.9, "tighter collimation: the central 90% of each side", in_view_recipe=True),
)
BY_NAME = {c.name: c for c in CONDITIONS}


def render(condition: Condition, pixels: np.ndarray, *, seed: int = 0) -> np.ndarray:
    """``pixels`` (float [H, W] in [0, 1]) as acquired under ``condition``: float32 [H, W] in [0, 1]."""
    x = np.clip(np.asarray(pixels, dtype=np.float32), 0.0, 1.0)
    scale = x.shape[1] / 64.0
    kind, a = condition.kind, condition.amount
    if kind == "none":
        out = x
    elif kind == "gamma":
        out = x ** a
    elif kind == "contrast":
        out = x.mean() + a * (x - x.mean())
    elif kind == "blur":
        out = _blur(x, a * scale)
    elif kind == "sharpen":
        out = x + a * (x - _blur(x, 1.0 * scale))
    elif kind == "noise":
        out = x + np.random.default_rng(seed).normal(0.0, a * scale, x.shape).astype(np.float32)
    elif kind == "lowres":
        out = _resize(_resize(x, (max(2, round(a * x.shape[0] / x.shape[1])), int(a))), x.shape)
    elif kind == "rotate":
        out = _affine(x, math.radians(a), 1.0)
    elif kind == "crop":
        out = _affine(x, 0.0, a)
    elif kind in ("window", "bits", "mono1"):
        out = _through_dicom(x, kind, a, seed)
    else:
        raise ValueError(f"unknown condition kind {kind!r}")
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def _torch(x: np.ndarray):
    import torch

    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None, None]


def _blur(x: np.ndarray, sigma: float) -> np.ndarray:
    import torch

    from common.views import gaussian_blur

    return gaussian_blur(_torch(x), torch.tensor([sigma]))[0, 0].numpy()


def _resize(x: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    from common.images import resize_image

    return resize_image(x, (int(shape[0]), int(shape[1])))


def _affine(x: np.ndarray, angle: float, side: float) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    theta = torch.tensor([[[side * math.cos(angle), -side * math.sin(angle), 0.0],
                           [side * math.sin(angle), side * math.cos(angle), 0.0]]], dtype=torch.float32)
    t = _torch(x)
    grid = F.affine_grid(theta, list(t.shape), align_corners=False)
    return F.grid_sample(t, grid, mode="bilinear", padding_mode="reflection", align_corners=False)[0, 0].numpy()


def _through_dicom(x: np.ndarray, kind: str, amount: float, seed: int) -> np.ndarray:
    """Write ``x`` as a CR file of the condition's storage and read it back through the site's reader."""
    from pydicom.uid import ExplicitVRLittleEndian

    from common.preprocess import load_pixels
    from simulations.acquisition import AcquisitionProfile, write_radiograph

    if kind == "bits":
        top = 2 ** int(amount) - 1
        profile = AcquisitionProfile(name="bench-bits", modality="CR", photometric="MONOCHROME2", bits_stored=8,
                                     stored_range=(0, top), transfer_syntax=ExplicitVRLittleEndian, matrix=x.shape)
    elif kind == "mono1":
        profile = AcquisitionProfile(name="bench-mono1", modality="CR", photometric="MONOCHROME1",
                                     bits_stored=int(amount), stored_range=(0, 2 ** int(amount) - 1),
                                     windows=((2047.5, 4096.0),), transfer_syntax=ExplicitVRLittleEndian, matrix=x.shape)
    else:  # a narrower window over the middle `amount` of a 12-bit stored range
        profile = AcquisitionProfile(name="bench-window", modality="CR", photometric="MONOCHROME2", bits_stored=12,
                                     stored_range=(0, 4095), windows=((2047.5, amount * 4096.0),),
                                     transfer_syntax=ExplicitVRLittleEndian, matrix=x.shape)
    with tempfile.TemporaryDirectory(prefix="fedxray-shift-") as tmp:
        path = Path(tmp) / "image.dcm"
        write_radiograph(path, x, profile, patient_id="SHIFT-0", patient_name="SHIFT^BENCH",
                         study_uid="2.25.1", view="PA", seed=seed)
        return load_pixels(path)
