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

docs/dicom.md explains each choice. Only the first frame of a multi-frame object is used. The
steps are in common/dicom_display.py, the file checks and decoding in common/dicom_decode.py;
this module reads a file through them and says what of it may leave the site.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import UID

from common.dicom_decode import check_image, decode_first_frame, open_dataset, transfer_syntax
from common.dicom_display import (  # noqa: F401 - the steps are part of this module's API (see the docstring)
    UnusableImageError,
    apply_modality_lut,
    apply_presentation,
    apply_voi,
    logger,
    photometric_interpretation,
    to_grey,
    voi_source,
)


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


class DicomError(ValueError):
    """A file that cannot be read as a radiograph; the message names the file and the reason.

    ``reason`` repeats the message without the path, for logs that must not carry file names.
    """

    def __init__(self, message: str, *, path: str = "", reason: str = "") -> None:
        super().__init__(message)
        self.path = path
        self.reason = reason or message


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
        ds = open_dataset(name)
        check_image(ds)
        syntax = transfer_syntax(ds)
        arr = decode_first_frame(ds, syntax)
        source = voi_source(ds)
        for step in (to_grey, apply_modality_lut, apply_voi, apply_presentation):
            arr = step(arr, ds)
        # The last step always returns a fresh float array, so clip it in place (no extra copy).
        pixels = np.ascontiguousarray(arr, dtype=np.float32)
        np.clip(pixels, 0.0, 1.0, out=pixels)
        np.nan_to_num(pixels, copy=False)  # only float pixel data can carry NaN
        meta = _safe_meta(ds, syntax, source, salt)
    except Exception as err:  # pydicom/numpy raise many types on hostile input: wrap them all
        reason = str(err) if isinstance(err, UnusableImageError) else f"unexpected {type(err).__name__}: {err}"
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


def _safe_meta(ds: Dataset, syntax: UID, window_source: str, salt: bytes | str) -> dict[str, Any]:
    """The only metadata that may leave the site: no names, IDs or instance UIDs in clear."""
    frames = int(ds.get("NumberOfFrames") or 1)
    if frames > 1:
        logger.debug("multi-frame object (%d frames): frame 0 used", frames)
    return {
        "modality": str(ds.get("Modality", "") or ""),
        "view": str(ds.get("ViewPosition", "") or ""),
        "photometric": photometric_interpretation(ds),
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
