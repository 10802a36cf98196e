"""The one image path: file -> display pixels -> model input (interface 3, docs/interfaces.md).

Every consumer that turns a radiograph into what a model sees goes through these two calls, so
training, evaluation, the ONNX parity check and inference in the clinic cannot drift apart:

1. :func:`load_pixels` reads a DICOM file (``common.dicom.read_radiograph``: modality LUT, VOI
   LUT / window, MONOCHROME1 and Presentation LUT inversion, compressed transfer syntaxes) or a
   PNG/JPEG research image (``common.images.read_image``) into float32 [H, W] in [0, 1], 1 the
   brightest displayed value, at native resolution.
2. :func:`to_model_input` resizes the whole image (bilinear with antialiasing, aspect not kept:
   ``common.images.resize_image``) and adds the batch and channel axes: float32 [1, 1, H, W],
   exactly what the exported ONNX graph takes.

The pixels stay float32 all the way: no 8-bit step between the file and the model.
"""

from __future__ import annotations

import os

import numpy as np

from common.dicom import read_radiograph
from common.images import is_image_file, read_image, resize_image

__all__ = ["load_pixels", "to_model_input"]


def load_pixels(path: str | os.PathLike[str]) -> np.ndarray:
    """Display-ready pixels of ``path``: float32 [H, W] in [0, 1], 1 = brightest, native size.

    PNG/JPEG are recognised by their suffix (``.png``, ``.jpg``, ``.jpeg``); every other file is
    read as DICOM, with or without a File Meta header. Raises ``common.dicom.DicomError`` or
    ``common.images.ImageError`` (both ValueError) whose message names the file and the reason.
    """
    if is_image_file(path):
        return read_image(path)
    return read_radiograph(path).pixels


def to_model_input(pixels: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """One image [H, W] in [0, 1] -> float32 [1, 1, S, S] (or [1, 1, H', W'] for a (H', W') size).

    ``size`` is the model's input size (``OnnxClassifier.input_size``, or the run's image size).
    Raises ValueError for an array that is not a 2-D image, so a caller's mistake (a batch, an
    RGB array) is not silently resized into something else.
    """
    arr = np.asarray(pixels)
    if arr.ndim != 2 or arr.size == 0:
        raise ValueError(f"to_model_input takes one grey image [H, W]; got shape {list(arr.shape)} (load it with load_pixels)")
    height, width = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if height < 1 or width < 1:
        raise ValueError(f"model input size must be positive, got {size!r}")
    resized = resize_image(arr.astype(np.float32, copy=False), (height, width))
    return np.ascontiguousarray(resized[None, None], dtype=np.float32)
