"""Read one DICOM radiograph into display-ready pixels and non-identifying metadata.

Every model in fedxray sees a radiograph the way a radiologist's viewer would show it, so the
same chest looks the same whatever the vendor, encoding or Photometric Interpretation. The
grayscale pipeline of PS3.4 Annex N.2 is applied as pure steps ``fn(arr, ds) -> arr`` that
leave ``arr`` untouched when their module is absent, in the standard's order:

1. ``to_grey``              colour (RGB/YBR/PALETTE COLOR) -> luminance in [0, 1]
2. ``apply_modality_lut``   Modality LUT Sequence, else Rescale Slope/Intercept (PS3.3 C.11.1)
3. ``apply_voi``            VOI LUT Sequence, else Window Center/Width with VOI LUT Function,
                            else min-max of the image (PS3.3 C.11.2); output in [0, 1]
4. ``apply_presentation``   MONOCHROME1 and Presentation LUT Shape INVERSE (PS3.3 C.7.6.1,
                            C.11.6): at most one inversion, so 1 is always the brightest value

docs/dicom.md explains each choice. Only the first frame of a multi-frame object is used.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import stat
import struct
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import get_decoder, pixel_array
from pydicom.pixels.processing import apply_color_lut
from pydicom.uid import UID

logger = logging.getLogger(__name__)


class _OnlyErrors(logging.Filter):
    """Drops pydicom's warnings while fedxray reads a file.

    They name the file's full path (a patient's folder and file name); fedxray reports an
    unreadable file once, as a DicomError kept at the site. Attached only around a read, so
    importing this module leaves pydicom's logging as the application configured it.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


_PYDICOM_QUIET = _OnlyErrors()

DEFAULT_SALT: bytes = b"fedxray-default-salt/for-tests-and-simulations-only"
"""Salt for tests and simulations only: a site must pass its own secret salt (kept in its state
dir), otherwise anyone could recompute patient hashes from guessed Patient IDs."""

_MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
_COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "PALETTE COLOR")
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # PS3.3 C.7.6.3.1.2 (YBR_FULL Y)
_NOT_DICOM_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF8", "a GIF image"),
    (b"II*\x00", "a TIFF image"),
    (b"MM\x00*", "a TIFF image"),
    (b"%PDF", "a PDF document"),
    (b"PK\x03\x04", "a ZIP archive"),
    (b"\x1f\x8b", "a gzip archive"),
)


class DicomError(ValueError):
    """A file that cannot be read as a radiograph; the message names the file and the reason.

    ``reason`` repeats the message without the path, for logs that must not carry file names.
    """

    def __init__(self, message: str, *, path: str = "", reason: str = "") -> None:
        super().__init__(message)
        self.path = path
        self.reason = reason or message


class _ReasonError(ValueError):
    """Internal: why a file is unusable (and the fix), before the path is attached."""

    def __init__(self, reason: str, fix: str = "") -> None:
        super().__init__(f"{reason}. Fix: {fix}" if fix else reason)


@dataclass(frozen=True)
class Radiograph:
    """Display-ready pixels plus metadata that may leave the site.

    ``pixels``: float32 [H, W] in [0, 1] at native resolution, 1 = brightest displayed (bone
    bright, air dark). ``meta``: modality, view, photometric, rows, cols, bits_stored,
    transfer_syntax, transfer_syntax_name, frames, frame_used, window_source and salted hashes
    of PatientID and StudyInstanceUID; never a name, an ID or a UID of the patient in clear.
    """

    pixels: np.ndarray
    meta: dict[str, Any]


def salted_hash(value: str, salt: bytes | str = DEFAULT_SALT) -> str:
    """HMAC-SHA256 hex of ``value`` keyed by ``salt``; "" for an empty value.

    A keyed hash rather than a bare sha256: without the site's salt nobody can test guessed
    Patient IDs against the hash, yet one site always maps one patient to one hash.
    """
    key = _salt_bytes(salt)
    value = value.strip()
    if not value:
        return ""
    return hmac.new(key, value.encode("utf-8"), hashlib.sha256).hexdigest()


def _salt_bytes(salt: bytes | str) -> bytes:
    """The salt as bytes; an empty or mistyped salt is the caller's bug (plain ValueError)."""
    key = salt.encode("utf-8") if isinstance(salt, str) else salt
    if not isinstance(key, bytes) or not key:
        raise ValueError("salt must be non-empty bytes or str: pass the site's secret salt")
    return key


def read_radiograph(path: str | os.PathLike[str], *, salt: bytes | str = DEFAULT_SALT) -> Radiograph:
    """Read ``path`` and return its first frame as display-ready pixels (see module docstring).

    Raises DicomError (a ValueError) naming ``path`` for anything unreadable or unsupported;
    no other exception type escapes for a bad file.
    """
    name = os.fspath(path)
    _salt_bytes(salt)  # checked before any file work
    pydicom_log = logging.getLogger("pydicom")
    pydicom_log.addFilter(_PYDICOM_QUIET)
    try:
        with warnings.catch_warnings():
            # pydicom warns with the file's full path (a patient's folder and file name) about defects
            # it can read past; the file either decodes, or fails with a DicomError kept at the site.
            warnings.simplefilter("ignore")
            return _read(name, salt)
    finally:
        pydicom_log.removeFilter(_PYDICOM_QUIET)


def _read(name: str, salt: bytes | str) -> Radiograph:
    try:
        ds = _open_dataset(name)
        _check_image(ds)
        syntax = _transfer_syntax(ds)
        arr = _decode_first_frame(ds, syntax)
        source = voi_source(ds)
        for step in (to_grey, apply_modality_lut, apply_voi, apply_presentation):
            arr = step(arr, ds)
        # The last step always returns a fresh float array, so clip it in place (no extra copy).
        pixels = np.ascontiguousarray(arr, dtype=np.float32)
        np.clip(pixels, 0.0, 1.0, out=pixels)
        np.nan_to_num(pixels, copy=False)  # only float pixel data can carry NaN
        meta = _safe_meta(ds, syntax, source, salt)
    except Exception as err:  # pydicom/numpy raise many types on hostile input: wrap them all
        reason = str(err) if isinstance(err, _ReasonError) else f"unexpected {type(err).__name__}: {err}"
        reason = reason.replace(name, "<file>")  # the reason alone must never carry the path
        raise DicomError(f"{name}: {reason}", path=name, reason=reason) from err
    logger.debug(  # no file name: site file names often carry an MRN or a patient's name
        "read a radiograph: %dx%d %s %s window=%s",
        meta["rows"],
        meta["cols"],
        meta["photometric"],
        meta["transfer_syntax_name"],
        source,
    )
    return Radiograph(pixels=pixels, meta=meta)


# --- reading -----------------------------------------------------------------------------


def _open_dataset(path: str) -> Dataset:
    """Check the file is there and looks like DICOM, then parse it (force=True for no-meta)."""
    try:
        info = os.stat(path)
    except FileNotFoundError as err:
        raise _ReasonError("file does not exist", "check the path and that the volume is mounted") from err
    except OSError as err:
        raise _ReasonError(f"file cannot be accessed ({err.strerror})") from err
    if stat.S_ISDIR(info.st_mode):
        raise _ReasonError("is a directory, not a file", "pass one DICOM file, or walk the folder")
    if not stat.S_ISREG(info.st_mode):
        raise _ReasonError("is not a regular file")
    if info.st_size == 0:
        raise _ReasonError("file is empty (0 bytes)", "copy or export it again")
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError as err:
        raise _ReasonError(f"file cannot be read ({err.strerror})", "give this process read access") from err
    if head[128:132] != b"DICM":
        for magic, what in _NOT_DICOM_MAGIC:
            if head.startswith(magic):
                raise _ReasonError(f"is {what}, not DICOM (a renamed file?)", "remove it from the DICOM folder")
        if not _looks_like_dataset(head):
            raise _ReasonError("not DICOM: no 'DICM' marker at byte 128 and no DICOM data element at the start")
    try:
        ds = pydicom.dcmread(path, force=True)
    except Exception as err:
        raise _ReasonError(f"cannot be parsed as DICOM ({type(err).__name__}: {err})") from err
    if len(ds) == 0:  # pydicom drops every element when the file ends inside one
        raise _ReasonError("no data element could be read: the file is truncated or corrupt", "copy or export it again")
    return ds


def _looks_like_dataset(head: bytes) -> bool:
    """True when the file starts with a plausible tag (group 0002..0028), as raw datasets do."""
    if len(head) < 8:
        return False
    groups = struct.unpack_from("<H", head)[0], struct.unpack_from(">H", head)[0]
    return any(g % 2 == 0 and 0x0002 <= g <= 0x0028 for g in groups)


def _check_image(ds: Dataset) -> None:
    """Refuse objects that are not single- or three-sample images we can display."""
    if not any(kw in ds for kw in _PIXEL_KEYWORDS):
        sop = ds.get("SOPClassUID")
        what = UID(str(sop)).name if sop else "object"
        hint = " (an image object without pixel data: the file is probably truncated)" if "Image" in what else ""
        modality = ds.get("Modality", "") or "?"
        raise _ReasonError(
            f"no Pixel Data (7FE0,0010): a {what} with Modality {modality} is not an image{hint}",
            "keep only radiograph images in the data folder",
        )
    for keyword, tag in (
        ("Rows", "(0028,0010)"),
        ("Columns", "(0028,0011)"),
        ("BitsAllocated", "(0028,0100)"),
        ("PhotometricInterpretation", "(0028,0004)"),
    ):
        if not ds.get(keyword):
            raise _ReasonError(f"required {tag} {keyword} is missing or empty")
    photometric = _photometric(ds)
    if photometric not in _MONOCHROME + _COLOUR:
        raise _ReasonError(
            f"(0028,0004) Photometric Interpretation '{photometric}' is not supported",
            f"export as one of {', '.join(_MONOCHROME + _COLOUR)}",
        )
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if samples not in (1, 3):
        raise _ReasonError(f"(0028,0002) Samples per Pixel {samples} is not supported (1 or 3 expected)")


def _transfer_syntax(ds: Dataset) -> UID:
    """The file's Transfer Syntax UID, or a guess (set into file_meta) when there is no meta."""
    meta = getattr(ds, "file_meta", None)
    if meta is not None and meta.get("TransferSyntaxUID"):
        return UID(str(meta.TransferSyntaxUID))
    data = ds.get("PixelData")
    if isinstance(data, bytes) and data[:4] == b"\xfe\xff\x00\xe0":  # encapsulated: sniff codec
        guess = _sniff_codec(data)
        if guess is None:
            raise _ReasonError(
                "compressed pixel data of unknown type and no Transfer Syntax UID",
                "export the file with its File Meta header",
            )
    else:
        implicit, little = ds.original_encoding
        if little is False:
            guess = pydicom.uid.ExplicitVRBigEndian
        else:
            guess = pydicom.uid.ImplicitVRLittleEndian if implicit else pydicom.uid.ExplicitVRLittleEndian
    logger.debug("no File Meta header: Transfer Syntax guessed as %s", guess.name)
    ds.file_meta = meta if meta is not None else FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = guess
    return guess


def _sniff_codec(data: bytes) -> UID | None:
    """Guess the transfer syntax of encapsulated pixel data from its first fragment's header."""
    bot_length = struct.unpack_from("<I", data, 4)[0]
    start = 8 + bot_length + 8  # skip the Basic Offset Table item, then the fragment's item header
    frag = data[start : start + 65536]
    if frag[:4] == b"\xff\x4f\xff\x51":  # JPEG 2000 codestream: reversible 5-3 wavelet -> lossless
        cod = frag.find(b"\xff\x52")
        reversible = cod > 0 and len(frag) > cod + 13 and frag[cod + 13] == 1
        return pydicom.uid.JPEG2000Lossless if reversible else pydicom.uid.JPEG2000
    if frag[4:8] == b"jP  ":
        return pydicom.uid.JPEG2000
    if frag[:2] == b"\xff\xd8":
        return _sniff_jpeg(frag)
    if len(frag) >= 64 and 1 <= struct.unpack_from("<I", frag)[0] <= 15 and struct.unpack_from("<I", frag, 4)[0] == 64:
        return pydicom.uid.RLELossless
    return None


def _sniff_jpeg(frag: bytes) -> UID | None:
    """Map the JPEG start-of-frame marker (and the predictor, for lossless) to a transfer syntax."""
    i, lossless = 2, False
    while i + 4 <= len(frag) and frag[i] == 0xFF:
        marker = frag[i + 1]
        if marker == 0xFF:
            i += 1
            continue
        if marker == 0xC0:
            return pydicom.uid.JPEGBaseline8Bit
        if marker in (0xC1, 0xC2):
            return pydicom.uid.JPEGExtended12Bit
        if marker == 0xF7:
            return pydicom.uid.JPEGLSLossless
        lossless = lossless or marker == 0xC3
        if marker == 0xDA and lossless:  # SOS: Ss (the predictor) follows the component specs
            predictor_at = i + 5 + 2 * frag[i + 4]
            sv1 = frag[predictor_at : predictor_at + 1] == b"\x01"
            return pydicom.uid.JPEGLosslessSV1 if sv1 else pydicom.uid.JPEGLossless
        i += 2 + struct.unpack_from(">H", frag, i + 2)[0]
    return None


def _decode_first_frame(ds: Dataset, syntax: UID) -> np.ndarray:
    """Decode frame 0 only (memory-sane for multi-frame); name the missing package on failure."""
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError as err:
        raise _ReasonError(
            f"transfer syntax {syntax.name} ({syntax}) is not supported",
            "export it uncompressed, JPEG, JPEG 2000 or RLE",
        ) from err
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies) or "no plugin available"
        raise _ReasonError(
            f"no decoder installed for {syntax.name} ({syntax}): {missing}",
            "install one of those packages (pylibjpeg-openjpeg for JPEG 2000, "
            "pylibjpeg-libjpeg for JPEG) into this environment",
        )
    try:
        arr = pixel_array(ds, index=0)
    except Exception as err:
        raise _ReasonError(
            f"pixel data could not be decoded as {syntax.name} ({type(err).__name__}: {err})",
            "the file is probably truncated or corrupt: export it again",
        ) from err
    expected = 3 if int(ds.get("SamplesPerPixel", 1) or 1) == 3 else 2
    if arr.ndim != expected or arr.size == 0:
        raise _ReasonError(f"decoded pixel array has shape {arr.shape}, expected {expected} dimensions")
    return arr


# --- the display chain (pure steps) -------------------------------------------------------


def to_grey(arr: np.ndarray, ds: Dataset) -> np.ndarray:
    """Colour -> luminance (BT.601 weights, the Y of YBR_FULL) in [0, 1]; grey unchanged.

    Colour pixels are already display values, so they are scaled by their full range rather
    than windowed: modality and VOI LUTs apply to grayscale images only (PS3.4 N.2).
    """
    photometric = _photometric(ds)
    if photometric in _MONOCHROME:
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
    if _is_colour(ds):
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
        raise _ReasonError(
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
    if _is_colour(ds):
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
    if _is_colour(ds):
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
    photometric = _photometric(ds)
    shape = str(_attr(ds, "PresentationLUTShape") or "").strip().upper()
    if photometric == "MONOCHROME1" and shape == "IDENTITY":
        logger.warning("MONOCHROME1 with Presentation LUT Shape IDENTITY: inverted per MONOCHROME1")
    if _attr(ds, "PresentationLUTSequence"):
        logger.debug("Presentation LUT Sequence ignored: only its shape is supported")
    if photometric == "MONOCHROME1" or shape == "INVERSE":
        return np.float32(1.0) - arr
    return arr


# --- helpers ------------------------------------------------------------------------------


def _photometric(ds: Dataset) -> str:
    return str(ds.get("PhotometricInterpretation", "") or "").strip().upper()


def _is_colour(ds: Dataset) -> bool:
    return _photometric(ds) not in _MONOCHROME


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
        raise _ReasonError(f"{tag} {keyword} value {value!r} is not a number") from err


def _window(ds: Dataset, *, quiet: bool = False) -> tuple[float, float, str] | None:
    """(center, width, function) of the first window, or None when absent or unusable.

    Unusable windows are logged (unless ``quiet``) and fall back to min-max rather than
    refusing the file: a bad default window should not cost the site an image."""
    warn = logger.debug if quiet else logger.warning
    try:
        center = _number(ds, "WindowCenter", "(0028,1050)", float("nan"))
        width = _number(ds, "WindowWidth", "(0028,1051)", float("nan"))
    except _ReasonError as err:
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
        raise _ReasonError(f"{what} has no valid (0028,3002) LUT Descriptor / (0028,3006) LUT Data") from err
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
        raise _ReasonError(f"{what} (0028,3006) LUT Data is empty")
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


def _safe_meta(ds: Dataset, syntax: UID, window_source: str, salt: bytes | str) -> dict[str, Any]:
    """The only metadata that may leave the site: no names, IDs or instance UIDs in clear."""
    frames = int(ds.get("NumberOfFrames") or 1)
    if frames > 1:
        logger.debug("multi-frame object (%d frames): frame 0 used", frames)
    return {
        "modality": str(ds.get("Modality", "") or ""),
        "view": str(ds.get("ViewPosition", "") or ""),
        "photometric": _photometric(ds),
        "rows": int(ds.Rows),
        "cols": int(ds.Columns),
        "bits_stored": int(ds.get("BitsStored") or ds.BitsAllocated),
        "transfer_syntax": str(syntax),
        "transfer_syntax_name": syntax.name,
        "frames": frames,
        "frame_used": 0,
        "window_source": window_source,
        "patient_hash": salted_hash(str(ds.get("PatientID", "") or ""), salt),
        "study_hash": salted_hash(str(ds.get("StudyInstanceUID", "") or ""), salt),
    }
