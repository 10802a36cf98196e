"""What one scored image produces, built in memory and written as files (``--out DIR``).

``DIR/<key>.sr.dcm`` (the SR), ``DIR/<key>.heatmap.png`` (the overlay) and
``DIR/<key>.heatmap.dcm`` (the overlay as a Secondary Capture), where ``<key>`` is the source's
SOP Instance UID when it is a valid UID, else ``sha256-`` and a hash of the file (clinic/uids.py);
a multilabel model adds ``DIR/<key>.<finding>.heatmap.png|dcm`` for the other findings called
positive (a PNG/JPEG input gets the PNG only, since an SR and a Secondary Capture must reference a
DICOM study). Files appear atomically (temp file + rename),
so a PACS import job watching the folder never picks up half a file. ``serve`` uses the same
objects to send them by C-STORE.
"""

from __future__ import annotations

import io
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image
from pydicom.dataset import Dataset

from clinic.heatmap import overlay
from clinic.model import Scored, Scorer
from clinic.predict import Source
from clinic.secondary_capture import build_secondary_capture
from clinic.sr import ReportError, build_sr, conformant_header
from clinic.uids import is_safe_key
from common.cache import atomic_write_bytes

logger = logging.getLogger(__name__)


@dataclass
class Outputs:
    """The SR, the overlay and its Secondary Capture for one image (each None when not made)."""

    key: str
    sr: Dataset | None = None
    overlay: NDArray[np.uint8] | None = None
    secondary_capture: Dataset | None = None
    problems: list[str] = field(default_factory=list)  # why something was not made (one line each)
    label: str = ""  # the finding of ``overlay``
    more_overlays: dict[str, NDArray[np.uint8]] = field(default_factory=dict)  # other findings' maps (multilabel)
    more_captures: dict[str, Dataset] = field(default_factory=dict)
    scored: Scored | None = None  # the result the outputs state (gated: not assessed when the header rules refuse it)

    def datasets(self) -> list[Dataset]:
        """The DICOM objects to send to a PACS: SR first, then the heatmaps."""
        return [ds for ds in (self.sr, self.secondary_capture, *self.more_captures.values()) if ds is not None]


def build_outputs(source: Source, scored: Scored, scorer: Scorer, *, dicom: bool = True) -> Outputs:
    """Build the outputs of one image. ``dicom=False`` skips the SR and Secondary Capture.

    The header rules of the intended-use gate apply here too (a caller may have scored the pixels
    only): an image outside the intended use gets an SR that says so, and no heatmap.
    """
    scored = scorer.regate(scored, source.header)
    out = Outputs(key=source.key, scored=scored)
    if scored.assessed and scored.attribution is not None:
        out.label = scored.explained_label
        out.overlay = overlay(source.pixels, scored.attribution, _caption(scorer, scored, scored.explained_label))
        out.more_overlays = {label: overlay(source.pixels, attribution, _caption(scorer, scored, label))
                             for label, attribution in scored.more_attributions.items()}
    if not dicom or source.header is None:
        return out
    with warnings.catch_warnings(record=True) as caught:
        # highdicom warns about odd header values (e.g. a one-component Patient Name) by quoting
        # them: patient data must not reach the log, so the warnings are counted, not shown.
        warnings.simplefilter("always")
        _build_dicom(out, source, scored, scorer)
    if caught:
        logger.debug("%d highdicom warning(s) about the source header (not shown: they may quote patient data)", len(caught))
    return out


def _caption(scorer: Scorer, scored: Scored, label: str) -> str:
    ident = scorer.identity
    threshold = ident.label_thresholds.get(label, ident.threshold)
    return (f"fedxray {ident.name}: {label} p={scored.probabilities[label]:.3f} (threshold {threshold:.3g}) "
            f"- decision support, not a diagnosis")


def _build_dicom(out: Outputs, source: Source, scored: Scored, scorer: Scorer) -> None:
    """Fill ``out.sr`` and ``out.secondary_capture``; a header that does not allow one is a problem line.

    Error messages name the missing or invalid attribute, never its value.
    """
    assert source.header is not None
    header = conformant_header(source.header)
    try:
        out.sr = build_sr(header, scored, scorer.identity, heatmap_method=scorer.heatmap_method if scored.assessed else None,
                          gate=scorer.gate_mode)
    except ReportError as err:
        out.problems.append(str(err))
    except Exception as err:  # highdicom rejects an attribute of the source: the score stands, the SR is skipped
        out.problems.append(f"no SR: the image header does not allow one ({_safe_reason(err)})")
    if out.overlay is not None and out.sr is not None:
        try:
            out.secondary_capture = build_secondary_capture(
                header, out.overlay, scorer.identity, method=scorer.heatmap_method or "", label=scored.explained_label
            )
            out.more_captures = {
                label: build_secondary_capture(header, rgb, scorer.identity, method=scorer.heatmap_method or "", label=label, top=False)
                for label, rgb in out.more_overlays.items()
            }
        except Exception as err:
            out.problems.append(f"no heatmap Secondary Capture: the image header does not allow one ({_safe_reason(err)})")


def _safe_reason(err: Exception) -> str:
    """The error's type, plus the attribute name for a missing attribute; never a value (it may be patient data)."""
    if isinstance(err, AttributeError) and getattr(err, "name", None):
        return f"missing {err.name}"
    return type(err).__name__


def write_outputs(outputs: Outputs, folder: Path, *, key: str | None = None) -> dict[str, Any]:
    """Write what was built under ``folder``, named ``key`` (default ``outputs.key``).

    The key must be one clinic/uids.py makes (a valid UID or a hash, with an optional ``-N``):
    anything else is refused with ValueError before a file is written, so no received value names
    a path. Returns {"sr", "heatmap_png", "heatmap_dcm"} -> path or None (the top finding's
    heatmap), and "heatmaps": {finding: PNG path} for every heatmap written (multilabel: more than one).
    """
    key = outputs.key if key is None else key
    if not is_safe_key(key):
        raise ValueError("refusing to name output files after a value that is not a valid UID or a file hash")
    folder.mkdir(parents=True, exist_ok=True)
    written: dict[str, Any] = {"sr": None, "heatmap_png": None, "heatmap_dcm": None, "heatmaps": {}}
    if outputs.sr is not None:
        written["sr"] = _write(folder / f"{key}.sr.dcm", dicom_bytes(outputs.sr))
    if outputs.overlay is not None:
        written["heatmap_png"] = _write(folder / f"{key}.heatmap.png", _png(outputs.overlay))
        written["heatmaps"][outputs.label] = written["heatmap_png"]
    if outputs.secondary_capture is not None:
        written["heatmap_dcm"] = _write(folder / f"{key}.heatmap.dcm", dicom_bytes(outputs.secondary_capture))
    for label, rgb in outputs.more_overlays.items():
        # <key>.<finding>.heatmap.png: still ends with .heatmap.png, so fl-predict never scores its own outputs
        stem = f"{key}.{_slug(label)}.heatmap"
        written["heatmaps"][label] = _write(folder / f"{stem}.png", _png(rgb))
        if label in outputs.more_captures:
            _write(folder / f"{stem}.dcm", dicom_bytes(outputs.more_captures[label]))
    return written


def _png(rgb: NDArray[np.uint8]) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb, mode="RGB").save(buf, format="PNG")
    return buf.getvalue()


def _slug(label: str) -> str:
    """A finding's name as a file-name part: letters, digits, '-' and '_' only."""
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in label) or "finding"


def dicom_bytes(ds: Dataset) -> bytes:
    """A dataset as a DICOM Part 10 file (preamble, File Meta) in memory."""
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _write(path: Path, data: bytes) -> str:
    atomic_write_bytes(path, data)
    return str(path)
