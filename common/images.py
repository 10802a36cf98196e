"""Research image files (PNG/JPEG) and the one resize every path shares.

Hospitals send DICOM; public research sets come as PNG or JPEG. Both end up as the same float32
[H, W] array in [0, 1] (1 = brightest), so training, evaluation and the ONNX contract agree.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})


class ImageError(ValueError):
    """A PNG/JPEG file could not be read; the message names the file and the reason."""


def is_image_file(path: str | os.PathLike) -> bool:
    """True for PNG/JPEG research images (by suffix); everything else is tried as DICOM."""
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read a PNG/JPEG as float32 [H, W] in [0, 1]; colour is converted to luminance.

    16-bit PNGs keep their depth (scaled by 65535). Raises ``ImageError`` naming the file.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(img, dtype=np.float32)
                top = 65535.0 if arr.max() > 255 else 255.0
                return np.clip(arr / top, 0.0, 1.0)
            grey = img.convert("L")
            return np.asarray(grey, dtype=np.float32) / 255.0
    except FileNotFoundError as err:
        raise ImageError(f"{path}: file not found") from err
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise ImageError(f"{path}: not a readable PNG/JPEG image ({err.__class__.__name__}: {err})") from err


def resize_image(pixels: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Resize a float [H, W] image to ``size`` (whole image, bilinear with antialiasing, aspect not kept).

    This is the resize of interface 3: a hospital feeding the ONNX model must resize the same way.
    """
    import torch  # deferred: `fl-client --help` and a bad argument answer without loading torch (about 2 s)
    import torch.nn.functional as F

    height, width = (size, size) if isinstance(size, int) else size
    arr = np.ascontiguousarray(pixels, dtype=np.float32)
    if arr.shape == (height, width):
        return arr.copy()
    tensor = torch.from_numpy(arr)[None, None]
    antialias = arr.shape[0] > height or arr.shape[1] > width
    out = F.interpolate(tensor, size=(height, width), mode="bilinear", align_corners=False, antialias=antialias)
    return out[0, 0].clamp_(0.0, 1.0).numpy()


def to_uint8(pixels: np.ndarray) -> np.ndarray:
    """[0, 1] float -> uint8 display values (the cache's storage form)."""
    return np.clip(np.rint(pixels * 255.0), 0, 255).astype(np.uint8)
