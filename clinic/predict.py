"""Files in, one result per image out: what ``fl-predict --model M PATH...`` does (interface 7, docs/interfaces.md).

Inputs are files and folders (walked recursively, in sorted order); DICOM files are read with
``common.preprocess.load_pixels`` (the one image path: presentation-correct pixels whatever the
vendor, encoding or Photometric Interpretation), PNG/JPEG too (for research images). A file that
cannot be read becomes one :class:`Skipped` line and the run goes on.

The JSON record of an image carries the file, the SOP Instance UID, the probabilities and the
decision, the model's name and threshold, and the paths of the files written. Never a patient
name, ID, birth date or accession number: those stay in the DICOM outputs, inside the hospital.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from numpy.typing import NDArray
from pydicom.dataset import Dataset

from clinic.model import Scored, Scorer
from clinic.uids import file_key
from common.dataset import NON_IMAGE_SUFFIXES
from common.images import is_image_file
from common.preprocess import load_pixels

logger = logging.getLogger(__name__)

# Our own outputs (and DICOMDIR indexes) are never scored, even when --out is inside an input folder.
OUTPUT_SUFFIXES = (".sr.dcm", ".heatmap.dcm", ".heatmap.png")
_NOT_INPUTS = frozenset({"DICOMDIR", "labels.csv"})


@dataclass(frozen=True)
class Source:
    """One readable input: display pixels, and for DICOM the header (no pixel data)."""

    path: Path
    pixels: NDArray[np.float32]  # [H, W] in [0, 1], 1 = brightest, native size
    header: Dataset | None  # DICOM header without Pixel Data; None for PNG/JPEG

    @property
    def sop_instance_uid(self) -> str | None:
        if self.header is None:
            return None
        return str(self.header.get("SOPInstanceUID", "") or "") or None

    @cached_property
    def key(self) -> str:
        """File-name stem for the outputs: the SOP Instance UID when it is a valid UID, else a hash of the file.

        Never the raw received value (clinic/uids.py): a UID such as ``../x`` must not name a path.
        """
        return file_key(self.sop_instance_uid, self.path)


@dataclass(frozen=True)
class Skipped:
    """An input that could not be scored, and why (one line, the fix included)."""

    path: Path
    reason: str


def iter_inputs(paths: list[str | os.PathLike[str]]) -> Iterator[Path | Skipped]:
    """Every candidate file under ``paths`` (files as given, folders recursively, sorted).

    Hidden files and folders, notes (.csv, .txt, ...), DICOMDIR and fedxray's own outputs are
    not candidates. A path that does not exist is a :class:`Skipped`.
    """
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            for dirpath, dirnames, filenames in os.walk(path):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                for name in sorted(filenames):
                    candidate = Path(dirpath) / name
                    if _is_candidate(candidate):
                        yield candidate
        elif path.exists():
            yield path
        else:
            yield Skipped(path, "no such file or folder: check the path")


def _is_candidate(path: Path) -> bool:
    name = path.name
    if name.startswith(".") or name in _NOT_INPUTS or name.lower().endswith(OUTPUT_SUFFIXES):
        return False
    return path.suffix.lower() not in NON_IMAGE_SUFFIXES


def read_source(path: Path) -> Source:
    """Pixels through the one image path, plus the DICOM header for the SR and the heatmap.

    Raises ValueError (DicomError / ImageError) naming the file and the reason.
    """
    pixels = load_pixels(path)
    if is_image_file(path):
        return Source(path, pixels, None)
    return Source(path, pixels, read_header(path))


def read_header(path: str | os.PathLike[str]) -> Dataset:
    """The DICOM header without Pixel Data (read_radiograph has already proved the file readable)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's warnings name the file's path: nothing to add here
        return pydicom.dcmread(path, stop_before_pixels=True, force=True)


def record(source: Source, scored: Scored, scorer: Scorer, outputs: dict[str, str | None]) -> dict[str, Any]:
    """The JSON line for one image (interface 7 keys first). No patient identifiers.

    ``assessed`` false (outside the intended use): ``probabilities`` and ``positive`` are empty and
    ``reason`` says why; ``gate`` is how images were checked ("on", "header-only", "off").
    """
    ident = scorer.identity
    return {
        "file": str(source.path),
        "sop_instance_uid": source.sop_instance_uid,
        "probabilities": {label: round(p, 6) for label, p in scored.probabilities.items()},
        "positive": list(scored.positive),
        "assessed": scored.assessed,
        "reason": scored.reason or None,
        "ood_score": None if scored.ood_score is None else round(scored.ood_score, 4),
        "gate": scorer.gate_mode,
        "threshold": ident.threshold,
        "thresholds": ident.label_thresholds,
        "operating_point": ident.operating_point,  # the rule, and set_by: federation | site (fl-client accept)
        "warnings": ident.warnings,  # the model's own (e.g. not for use on patients): they travel with every result
        "model": ident.name,
        "model_sha256": ident.sha256[:12],
        "heatmap_label": scored.explained_label if scored.attribution is not None else None,
        **outputs,
    }


def summary_line(source: Source, scored: Scored) -> str:
    """Human-readable one-liner: where, which label(s) positive, the probabilities (or why not assessed)."""
    if not scored.assessed:
        return f"{source.path}: NOT ASSESSED: {scored.reason}"
    probs = ", ".join(f"{label} {p:.3f}" for label, p in scored.probabilities.items())
    verdict = "POSITIVE " + "+".join(scored.positive) if scored.positive else "negative"
    return f"{source.path}: {verdict} ({probs})"
