"""A hospital's data folder as a list of labelled, readable images (interface 2, docs/interfaces.md).

A site folder holds DICOM files at any depth (PNG/JPEG too, for research sets). Labels come from
``labels.csv`` (column ``file`` = path relative to the folder, plus a ``label`` column, a column of
'|'-separated findings, one 1/0/-1/blank column per finding, or any column the run names; see
common/labels.py) or, without a labels.csv, from class subfolders (``NORMAL/``, ``PNEUMONIA/``).
Unreadable files are skipped and reported with a reason, never the end of a run.

Everything here stays at the site. ``ImageRecord.path`` is a local path and is never logged;
patients are known only by a salted hash, used to keep every patient's images on one side of the
train/validation split.

Reading labels.csv is common/site_labels.py; the site salt, the pseudonyms and the patient-level
split are common/site_split.py. Their public names are importable from here as before.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Sequence
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common.cache import CACHE_VERSION, SiteCache, file_sha256, pack_digest
from common.images import ImageError, is_image_file, read_image, resize_image, to_uint8
from common.labels import (  # noqa: F401 - NEGATIVE_NAMES, POSITIVE_FLAGS: re-exported for callers
    NEGATIVE_NAMES,
    POSITIVE_FLAGS,
    LabelError,
    LabelPolicy,
    encode,
)
from common.progress import progress as progress_of
from common.site_files import LABELS_FILE as LABELS_FILE
from common.site_files import NON_IMAGE_SUFFIXES as NON_IMAGE_SUFFIXES
from common.site_files import candidate_files
from common.site_labels import DatasetError as DatasetError  # re-exported: raised here, defined with labels.csv
from common.site_labels import _Labels, _read_labels_csv, no_labels_message
from common.site_split import Split as Split
from common.site_split import Targets as Targets
from common.site_split import _hash
from common.site_split import patient_strata as patient_strata
from common.site_split import site_salt as site_salt
from common.site_split import split_patients as split_patients

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImageRecord:
    """One usable image. ``path`` is local to the site and must never leave it or reach a log."""

    path: Path
    classes: tuple[str, ...]  # single-label: (class,); findings columns: the findings present
    patient: str  # salted hash of the patient (or study/file fallback)
    patient_source: str  # "patient" | "study" | "file"
    content_hash: str  # sha256 of the file bytes
    meta: dict[str, Any] = field(default_factory=dict)  # non-identifying fields only
    pixels: np.ndarray | None = field(default=None, repr=False, compare=False)  # uint8 [S, S] when loaded
    label_row: dict[str, str] = field(default_factory=dict, repr=False, compare=False)  # labels.csv label cells


@dataclass(frozen=True)
class Skipped:
    """A file that was not used, and why. ``path`` is local: print it only on the site's own terminal."""

    path: Path
    reason: str


@dataclass
class SiteIndex:
    """What a site folder holds: usable records, skipped files, where labels came from."""

    root: Path
    records: list[ImageRecord]
    skipped: list[Skipped]
    label_source: str  # "labels.csv (label column)" | "labels.csv (finding columns)" | "class folders"
    label_kind: str  # "single" (one class per image) | "multi" (finding columns or a findings list)
    class_names: tuple[str, ...]  # every class or finding seen, sorted
    ignored: int = 0  # non-image files (csv, txt, ...) not considered
    label_columns: tuple[str, ...] = ()  # labels.csv columns a run may take its targets from

    @property
    def content_hashes(self) -> list[str]:
        return [r.content_hash for r in self.records]


# --------------------------------------------------------------------------- scanning


def _decode(path: Path, salt: bytes | str, image_size: int | None) -> tuple[dict[str, Any], np.ndarray | None]:
    """Read one file into (non-identifying meta, uint8 resized pixels or None)."""
    from common.dicom import DicomError, read_radiograph

    if is_image_file(path):
        pixels = read_image(path)
        meta: dict[str, Any] = {
            "modality": "",
            "photometric": "MONOCHROME2",
            "rows": int(pixels.shape[0]),
            "cols": int(pixels.shape[1]),
            "bits_stored": 8,
            "transfer_syntax_name": path.suffix.lower().lstrip(".").upper(),
            "format": "image",
            "patient_hash": "",
            "study_hash": "",
        }
    else:
        try:
            rad = read_radiograph(path, salt=salt)
        except DicomError:
            raise
        pixels = rad.pixels
        meta = dict(rad.meta)
        meta["format"] = "dicom"
    resized = to_uint8(resize_image(pixels, image_size)) if image_size else None
    return meta, resized


def _read_one(
    path: Path, salt: bytes | str, image_size: int | None, cache: SiteCache | None, key: str | None = None
) -> tuple[str, dict[str, Any] | None, np.ndarray | None, str | None]:
    """(content hash, meta, pixels, skip reason) for one file, through the cache when there is one."""
    from common.dicom import DicomError

    if key is None:
        try:
            key = file_sha256(path)
        except OSError as err:
            return "", None, None, f"cannot read file ({err.strerror or err})"
    if cache is not None:
        entry = cache.get_meta(key)
        if entry is not None and not entry.get("ok", False):
            return key, None, None, str(entry.get("reason", "unreadable"))
        if entry is not None:
            pixels = cache.get_pixels(key, image_size) if image_size else None
            if image_size is None or pixels is not None:
                return key, entry["meta"], pixels, None
    try:
        meta, pixels = _decode(path, salt, image_size)
    except (DicomError, ImageError) as err:
        # Keep only the reason, not the path, so the cache holds nothing identifying.
        reason = str(err)
        reason = reason.split(": ", 1)[1] if reason.startswith(str(path)) and ": " in reason else reason
        reason = reason.replace(str(path), "<file>")
        if cache is not None:
            cache.put_meta(key, {"ok": False, "reason": reason})
        return key, None, None, reason
    except (MemoryError, RuntimeError, ValueError, OSError) as err:
        reason = f"{err.__class__.__name__}: {err}".replace(str(path), "<file>")
        return key, None, None, reason
    if cache is not None:
        cache.put_meta(key, {"ok": True, "meta": meta})
        if pixels is not None and image_size:
            cache.put_pixels(key, image_size, pixels)
    return key, meta, pixels, None


_Read = tuple[str, "dict[str, Any] | None", "np.ndarray | None", "str | None"]


def _read_all(todo: list[tuple[Path, str, tuple[str, ...]]], salt: bytes | str, image_size: int | None,
              cache: SiteCache | None, progress: bool) -> list[_Read]:
    """_read_one for every file, or one earlier scan's pack when nothing changed.

    With a cache, a file is hashed only when its stat changed since the last scan (FileIndex), and
    when every content hash matches an earlier scan at this image size, its pack answers at once.
    """
    index = cache.file_index() if cache is not None else None
    keys: list[str | None] = []
    failed: dict[int, str] = {}
    for i, (path, _, _) in enumerate(todo):
        try:
            keys.append(index.sha256(path) if index is not None else None)
        except OSError as err:
            keys.append("")
            failed[i] = f"cannot read file ({err.strerror or err})"
    if index is not None:
        index.save()
    packable = cache is not None and image_size is not None and not failed
    digest = pack_digest(CACHE_VERSION, image_size, keys) if packable else ""
    if packable:
        pack = cache.get_scan_pack(image_size, digest)  # type: ignore[union-attr,arg-type]
        if pack is not None and len(pack[0]) == len(keys):
            entries, stacked = pack
            out: list[_Read] = []
            j = 0
            for key, entry in zip(keys, entries, strict=True):
                if entry.get("key") != key:
                    break
                if entry.get("ok"):
                    out.append((key, entry["meta"], stacked[j], None))
                    j += 1
                else:
                    out.append((key, None, None, str(entry.get("reason", "unreadable"))))
            else:
                return out
    results: list[_Read] = []
    with closing(progress_of(len(todo), "reading images", "file", bar=progress, leave=False)) as shown:
        for i in range(len(todo)):  # a bar on a terminal, else a line every few seconds (common/progress.py)
            if i in failed:
                results.append(("", None, None, failed[i]))
            else:
                results.append(_read_one(todo[i][0], salt, image_size, cache, keys[i]))
            shown.update(1)
    if packable and all(r[1] is not None or (cache.get_meta(r[0]) or {}).get("ok") is False for r in results):  # type: ignore[union-attr]
        entries = [{"key": k, "ok": True, "meta": m} if m is not None else {"key": k, "ok": False, "reason": why}
                   for k, m, _, why in results]
        stacked = [p for _, m, p, _ in results if m is not None]
        if all(p is not None for p in stacked):
            empty = np.zeros((0, image_size, image_size), np.uint8)  # type: ignore[arg-type]
            cache.put_scan_pack(image_size, digest, entries, np.stack(stacked) if stacked else empty)  # type: ignore[union-attr,arg-type]
    return results


def scan_site(
    data_dir: str | os.PathLike,
    *,
    salt: bytes | str,
    image_size: int | None = None,
    cache: SiteCache | None = None,
    progress: bool = False,
    require_labels: bool = True,
) -> SiteIndex:
    """Find every labelled, readable image under ``data_dir``.

    ``require_labels=False`` (``fl-client check`` before labelling) accepts a folder without
    labels.csv or class subfolders: every readable image is listed with no class.

    With ``image_size`` the records carry uint8 [S, S] pixels (resized once and kept in ``cache``
    when one is given: later scans decode nothing). Without it, files are still fully decoded so
    that a corrupt file is found now and not in the middle of a round.

    Raises ``DatasetError`` when the folder is missing or holds no usable image.
    """
    root = Path(data_dir).expanduser().resolve()
    if not root.is_dir():
        raise DatasetError(f"data folder {str(root)!r} does not exist or is not a folder: check --data")
    labels_path = root / LABELS_FILE
    labels: _Labels | None = _read_labels_csv(labels_path) if labels_path.is_file() else None
    files, ignored = candidate_files(root)
    unlabelled = False
    if labels is None:
        class_dirs = sorted({f.relative_to(root).parts[0] for f in files if len(f.relative_to(root).parts) > 1})
        if not class_dirs and require_labels:
            raise DatasetError(no_labels_message(root, len(files), sorted(p.name for p in root.iterdir() if p.is_dir())))
        unlabelled = not class_dirs
        source, kind = ("none (unlabelled)" if unlabelled else "class folders"), "single"
    else:
        source, kind = labels.source, labels.kind

    records: list[ImageRecord] = []
    skipped: list[Skipped] = []
    missing_patient = Counter()
    seen_rel: set[str] = set()
    todo: list[tuple[Path, str, tuple[str, ...]]] = []
    prefix = len(str(root)) + 1
    for path in files:
        rel = str(path)[prefix:].replace(os.sep, "/")  # = path.relative_to(root).as_posix(), without the Path work
        if labels is not None:
            classes = labels.by_file.get(rel)
            if classes is None:
                skipped.append(Skipped(path, "no label in labels.csv"))
                continue
        elif unlabelled:
            classes = ()
        else:
            if len(path.relative_to(root).parts) < 2:
                skipped.append(Skipped(path, "not inside a class subfolder"))
                continue
            classes = (path.relative_to(root).parts[0],)
        seen_rel.add(rel)
        todo.append((path, rel, tuple(classes)))
    results = _read_all(todo, salt, image_size, cache, progress)
    for (path, rel, classes), (key, meta, pixels, reason) in zip(todo, results, strict=True):
        if reason is not None or meta is None:
            skipped.append(Skipped(path, reason or "unreadable"))
            continue
        patient_id = labels.patients.get(rel) if labels is not None else None
        if meta.get("patient_hash"):
            patient, source_kind = meta["patient_hash"], "patient"
        elif patient_id:
            patient, source_kind = _hash(patient_id, salt), "patient"
        elif meta.get("study_hash"):
            patient, source_kind = meta["study_hash"], "study"
            missing_patient["study"] += 1
        else:
            patient, source_kind = _hash("file:" + key, salt), "file"
            missing_patient["file"] += 1
        row = labels.rows.get(rel, {}) if labels is not None else ({"label": classes[0]} if classes else {})
        records.append(ImageRecord(path, tuple(classes), patient, source_kind, key, meta, pixels, row))

    if labels is not None:
        for rel in sorted(set(labels.by_file) - seen_rel):
            if not (root / rel).is_file():
                skipped.append(Skipped(root / rel, "listed in labels.csv but the file is missing"))
    if missing_patient["study"]:
        log.warning(
            "%d image(s) have no PatientID: split by StudyInstanceUID instead (a patient with several "
            "studies could then fall on both sides of the split)",
            missing_patient["study"],
        )
    if missing_patient["file"]:
        log.warning(
            "%d image(s) have neither PatientID nor StudyInstanceUID (nor a patient_id in labels.csv): "
            "each is treated as its own patient",
            missing_patient["file"],
        )
    if not records:
        reasons = Counter(s.reason for s in skipped).most_common(3)
        detail = "; ".join(f"{n} x {r}" for r, n in reasons) or "no candidate files"
        raise DatasetError(f"{root}: no usable image found ({detail})")
    if labels is not None:
        names = labels.names
    else:
        names = tuple(sorted({c for r in records for c in r.classes}))
    columns = labels.columns if labels is not None else ("label",)
    return SiteIndex(root, records, skipped, source, kind, names, ignored, columns)


# --------------------------------------------------------------------------- targets


def encode_targets(index: SiteIndex, task: str, labels: Sequence[str], policy: LabelPolicy | None = None) -> Targets:
    """Turn the site's label table into the run's targets (common/labels.py says how each style reads).

    binary: 1 for the positive finding ``labels[0]``, 0 for the other class (a single-label site
    may have exactly one other class, or several named like "normal"); multiclass: index into
    ``labels``; multilabel: one column per label, NaN where a finding is masked (uncertain or blank
    under an ``ignore`` policy, or not labelled at this site). Images with no target under this
    task are left out (and counted in ``dropped``), so a site with an extra class still trains on
    the rest.
    """
    policy = policy or LabelPolicy()
    rows = [r.label_row for r in index.records]
    try:
        enc = encode(rows, index.label_columns, task, labels, policy)
    except LabelError as err:
        raise DatasetError(str(err)) from err
    if not enc.keep:
        raise DatasetError(
            f"no image of this site fits the run's labels ({', '.join(labels)}); "
            f"the site has: {', '.join(index.class_names)}"
        )
    source = "class folders" if index.label_source == "class folders" else enc.source
    return Targets(enc.y, task, tuple(labels), np.asarray(enc.keep, dtype=np.int64), enc.dropped, source,
                   enc.not_labelled, enc.uncertain, enc.blank)


