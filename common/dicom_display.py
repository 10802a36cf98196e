"""The grayscale display chain of PS3.4 Annex N.2, as pure steps ``fn(arr, ds) -> arr``.

Each step leaves ``arr`` untouched when its module is absent; common/dicom.py applies them in the
standard's order (``to_grey``, ``apply_modality_lut``, ``apply_voi``, ``apply_presentation``) to
the first frame that common/dicom_decode.py decoded. Also here: what both need to know about a
dataset's Photometric Interpretation, and the error that says why an image is unusable.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels.processing import apply_color_lut

#: The DICOM reader's one logger (common.dicom): operators filter one name, whichever step warns.
logger = logging.getLogger("common.dicom")

MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "PALETTE COLOR")
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # PS3.3 C.7.6.3.1.2 (YBR_FULL Y)


class UnusableImageError(ValueError):
    """Why a file is unusable (and the fix), before common/dicom.py attaches the path (as a DicomError)."""

    def __init__(self, reason: str, fix: str = "") -> None:
        super().__init__(f"{reason}. Fix: {fix}" if fix else reason)


def photometric_interpretation(ds: Dataset) -> str:
    """(0028,0004) Photometric Interpretation, upper case, "" when absent."""
    return str(ds.get("PhotometricInterpretation", "") or "").strip().upper()


def is_colour(ds: Dataset) -> bool:
    """True unless MONOCHROME1/2: modality and VOI LUTs apply to grayscale only."""
    return photometric_interpretation(ds) not in MONOCHROME


# --- the steps ------------------------------------------------------------------------------


def to_grey(arr: np.ndarray, ds: Dataset) -> np.ndarray:
    """Colour -> luminance (BT.601 weights, the Y of YBR_FULL) in [0, 1]; grey unchanged.

    Colour pixels are already display values, so they are scaled by their full range rather
    than windowed: modality and VOI LUTs apply to grayscale images only (PS3.4 N.2).
    """
    photometric = photometric_interpretation(ds)
    if photometric in MONOCHROME:
        return arr
    if photometric == "PALETTE COLOR":  # PS3.3 C.7.6.3.1.5
        bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
        arr = apply_color_lut(arr, ds)[..., :3]  # drop alpha, if any
    else:
        bits = int(ds.get("BitsStored") or ds.BitsAllocated)
    grey = arr.astype(np.float32) @ _LUMA
    grey *= 1.0 / (2**bits - 1)
    return grey


def apply_modality_lut(arr: np.ndarray, ds: Dataset) -> np.ndarray:
    """Stored values -> modality values: Modality LUT Sequence, else Rescale (PS3.3 C.11.1)."""
    if is_colour(ds):
        return arr
    sequence = _attr(ds, "ModalityLUTSequence")
    if sequence:
        first, table, _bits = _lut_table(sequence[0], ds, "Modality LUT")
        if first >= 2**15 and int(ds.get("PixelRepresentation", 0) or 0) == 1:
            first -= 2**16  # first value mapped is SS for signed pixels (C.11.1.1.1)
        return table[_lut_index(arr, first, table.size)]
    slope = _number(ds, "RescaleSlope", "(0028,1053)", 1.0)
    intercept = _number(ds, "RescaleIntercept", "(0028,1052)", 0.0)
    if slope == 0:
        raise UnusableImageError(
            "(0028,1053) Rescale Slope is 0: every pixel would map to one value", "correct the header at the modality"
        )
    if slope == 1 and intercept == 0:
        return arr
    if slope == 1 and intercept.is_integer() and arr.dtype.kind in "iu" and arr.dtype.itemsize <= 2:
        return arr.astype(np.int32) + np.int32(intercept)  # stays integer for an exact VOI LUT
    out = arr.astype(np.float32)
    out *= slope
    out += intercept
    return out


def voi_source(ds: Dataset) -> str:
    """Which VOI transform applies: "voi_lut", "window" or "none" (min-max of the image)."""
    if is_colour(ds):
        return "none"
    sequence = _attr(ds, "VOILUTSequence")
    if sequence and "LUTDescriptor" in sequence[0] and "LUTData" in sequence[0]:
        return "voi_lut"
    return "window" if _window(ds, quiet=True) is not None else "none"


def apply_voi(arr: np.ndarray, ds: Dataset) -> np.ndarray:
    """Modality values -> [0, 1]: VOI LUT, else first Window Center/Width, else min-max.

    PS3.3 C.11.2.1.2.1 (LINEAR), C.11.2.1.3.1 (SIGMOID), C.11.2.1.3.2 (LINEAR_EXACT), with
    y_min = 0 and y_max = 1. 0 is the lowest output, i.e. white for MONOCHROME1.
    """
    if is_colour(ds):
        return arr
    source = voi_source(ds)
    if source == "voi_lut":
        first, table, bits = _lut_table(_attr(ds, "VOILUTSequence")[0], ds, "VOI LUT")
        if first >= 2**15 and arr.min() < 0:
            first -= 2**16  # first value mapped is SS when modality values can be negative
        scale = max(2**bits - 1, int(table.max()), 1)  # some LUTs overflow their declared bits
        lut = table.astype(np.float32) / np.float32(scale)
        return lut[_lut_index(arr, first, lut.size)]
    window = _window(ds)
    if window is None:
        out = arr.astype(np.float32)
        np.nan_to_num(out, copy=False)
        low, high = float(out.min()), float(out.max())
        if high <= low:
            logger.warning("image has a single value (%g): it displays blank", low)
            return np.zeros_like(out)
        out -= low
        out *= 1.0 / (high - low)
        return out
    center, width, function = window
    out = arr.astype(np.float32)
    if function == "SIGMOID":
        out -= center
        out *= -4.0 / width
        with np.errstate(over="ignore"):
            np.exp(out, out=out)
        out += 1.0
        np.reciprocal(out, out=out)
        return out
    if function == "LINEAR" and width == 1:  # a threshold: the standard's formula divides by 0
        return (out > center - 0.5).astype(np.float32)
    if function == "LINEAR":
        center, width = center - 0.5, width - 1.0
    out -= center
    out *= 1.0 / width
    out += 0.5
    np.clip(out, 0.0, 1.0, out=out)
    return out


def apply_presentation(arr: np.ndarray, ds: Dataset) -> np.ndarray:
    """Make 1 the brightest value: invert MONOCHROME1, or any image with Shape INVERSE, once.

    For an image, Presentation LUT Shape INVERSE is what MONOCHROME1 already requires (PS3.3
    C.7.6.1: "INVERSE shall be used if Photometric Interpretation is MONOCHROME1"), so
    MONOCHROME1 + INVERSE inverts once. MONOCHROME1 + IDENTITY is a header conflict; the
    Photometric Interpretation describes the pixel data itself, so it wins (and we warn).
    """
    photometric = photometric_interpretation(ds)
    shape = str(_attr(ds, "PresentationLUTShape") or "").strip().upper()
    if photometric == "MONOCHROME1" and shape == "IDENTITY":
        logger.warning("MONOCHROME1 with Presentation LUT Shape IDENTITY: inverted per MONOCHROME1")
    if _attr(ds, "PresentationLUTSequence"):
        logger.debug("Presentation LUT Sequence ignored: only its shape is supported")
    if photometric == "MONOCHROME1" or shape == "INVERSE":
        return np.float32(1.0) - arr
    return arr


# --- helpers ------------------------------------------------------------------------------


def _attr(ds: Dataset, keyword: str) -> Any:
    """Value in effect for frame 0: per-frame, then shared functional groups (PS3.3 C.7.6.16,
    Pixel Value Transformation and Frame VOI LUT macros), then the top level."""
    for groups_keyword in ("PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence"):
        groups = ds.get(groups_keyword)
        if not groups:
            continue
        for macro in ("PixelValueTransformationSequence", "FrameVOILUTSequence"):
            items = groups[0].get(macro)
            if items and keyword in items[0]:
                return items[0][keyword].value
    return ds.get(keyword)


def _first(value: Any) -> Any:
    """First of a multi-valued element (several windows: the first is the default)."""
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        return value[0] if len(value) else None
    return value


def _number(ds: Dataset, keyword: str, tag: str, default: float) -> float:
    value = _first(_attr(ds, keyword))
    if value is None or value == "":
        return default
    try:
        return float(value)
    except (TypeError, ValueError) as err:
        raise UnusableImageError(f"{tag} {keyword} value {value!r} is not a number") from err


def _window(ds: Dataset, *, quiet: bool = False) -> tuple[float, float, str] | None:
    """(center, width, function) of the first window, or None when absent or unusable.

    Unusable windows are logged (unless ``quiet``) and fall back to min-max rather than
    refusing the file: a bad default window should not cost the site an image."""
    warn = logger.debug if quiet else logger.warning
    try:
        center = _number(ds, "WindowCenter", "(0028,1050)", float("nan"))
        width = _number(ds, "WindowWidth", "(0028,1051)", float("nan"))
    except UnusableImageError as err:
        warn("window ignored, min-max used instead: %s", err)
        return None
    if np.isnan(center) or np.isnan(width):
        return None
    function = str(_attr(ds, "VOILUTFunction") or "LINEAR").strip().upper()
    if function not in ("LINEAR", "LINEAR_EXACT", "SIGMOID"):
        warn("unknown VOI LUT Function %r: LINEAR used", function)
        function = "LINEAR"
    if width < (1 if function == "LINEAR" else np.nextafter(0, 1)):
        warn("window width %g invalid for %s: min-max used instead", width, function)
        return None
    return center, width, function


def _lut_table(item: Dataset, ds: Dataset, what: str) -> tuple[int, np.ndarray, int]:
    """(first value mapped, table, bits per entry) of a LUT item (PS3.3 C.11.1.1.1, C.11.2.1.1)."""
    try:
        entries, first, bits = (int(v) for v in item.LUTDescriptor)
        data = item.LUTData
    except (AttributeError, TypeError, ValueError) as err:
        raise UnusableImageError(f"{what} has no valid (0028,3002) LUT Descriptor / (0028,3006) LUT Data") from err
    entries = entries or 2**16
    if isinstance(data, bytes):
        little = ds.original_encoding[1] is not False
        if bits <= 8 and len(data) in (entries, entries + 1):
            table = np.frombuffer(data[:entries], dtype=np.uint8)
        else:
            table = np.frombuffer(data[: len(data) // 2 * 2], dtype="<u2" if little else ">u2")
    else:
        table = np.asarray(data if isinstance(data, (list, pydicom.multival.MultiValue)) else [data], dtype=np.uint16)
    if table.size == 0:
        raise UnusableImageError(f"{what} (0028,3006) LUT Data is empty")
    if table.size != entries:
        logger.warning("%s has %d entries, descriptor says %d: using the data", what, table.size, entries)
    return first, table, bits


def _lut_index(arr: np.ndarray, first: int, size: int) -> np.ndarray:
    """LUT indices for ``arr``: below the first mapped value -> entry 0, above -> last entry."""
    if arr.dtype.kind in "iu":
        idx = arr.astype(np.int64 if arr.dtype.itemsize > 2 else np.int32)
    else:
        idx = np.rint(np.clip(arr, first, first + size - 1)).astype(np.int64)
    idx -= first
    np.clip(idx, 0, size - 1, out=idx)
    return idx
