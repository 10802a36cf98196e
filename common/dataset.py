"""A hospital's data folder as a list of labelled, readable images (contract 2).

A site folder holds DICOM files at any depth (PNG/JPEG too, for research sets). Labels come from
``labels.csv`` (column ``file`` = path relative to the folder, plus a ``label`` column, a column of
'|'-separated findings, one 1/0/-1/blank column per finding, or any column the run names; see
common/labels.py) or, without a labels.csv, from class subfolders (``NORMAL/``, ``PNEUMONIA/``).
Unreadable files are skipped and reported with a reason, never the end of a run.

Everything here stays at the site. ``ImageRecord.path`` is a local path and is never logged;
patients are known only by a salted hash, used to keep every patient's images on one side of the
train/validation split.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
import secrets
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common.cache import SiteCache, file_sha256
from common.images import ImageError, is_image_file, read_image, resize_image, to_uint8
from common.labels import (  # noqa: F401 - NEGATIVE_NAMES, POSITIVE_FLAGS: re-exported for callers
    NEGATIVE_NAMES,
    NON_LABEL_COLUMNS,
    POSITIVE_FLAGS,
    LabelError,
    LabelPolicy,
    encode,
    finding_columns,
    list_column,
)
from common.labels import key as label_key

log = logging.getLogger(__name__)

LABELS_FILE = "labels.csv"
# Files that are clearly not images and are ignored without being reported as skipped.
NON_IMAGE_SUFFIXES = frozenset(
    {".csv", ".txt", ".md", ".json", ".xml", ".html", ".pdf", ".log", ".ini", ".yaml", ".yml", ".toml", ".npy", ".zip"}
)
# labels.csv columns an ImageRecord never carries (identifiers and file names stay in the table).
_PRIVATE_COLUMNS = frozenset({"file", "path", "patient id", "patient id coarse", "patient", "sha256", "study", "study id",
                              "dicom id", "subject id"})


class DatasetError(ValueError):
    """The site folder cannot be used (nothing readable, bad labels.csv, labels do not fit the run)."""


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


@dataclass(frozen=True)
class Targets:
    """Training targets for a run's task: binary/multilabel float [N, C], multiclass int64 [N]."""

    y: np.ndarray
    task: str
    labels: tuple[str, ...]
    keep: np.ndarray  # indices of index.records that have a target under this task
    dropped: dict[str, int]  # reason -> count for records with no target under this task
    source: str = ""  # which labels.csv column(s) (or class folders) the targets came from
    not_labelled: tuple[str, ...] = ()  # run labels this site does not label: masked (NaN) for every image
    uncertain: dict[str, int] = field(default_factory=dict)  # run label -> -1 cells (per the uncertain policy)
    blank: dict[str, int] = field(default_factory=dict)  # run label -> blank cells (per the blank policy)


# --------------------------------------------------------------------------- site salt


def site_salt(state_dir: str | os.PathLike) -> bytes:
    """The site's secret salt for patient hashes, created once (0600) in the state dir.

    A salt kept at the site means the hashes cannot be reversed by trying likely PatientIDs
    elsewhere; it never leaves the site.
    """
    path = Path(state_dir) / "salt"
    if path.exists():
        return path.read_bytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    value = secrets.token_hex(32).encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(value)
    return value


def _hash(value: str, salt: bytes | str) -> str:
    """The same keyed hash the DICOM reader uses for PatientID, so both kinds of file agree."""
    from common.dicom import salted_hash

    return salted_hash(value, salt)


# --------------------------------------------------------------------------- labels


@dataclass
class _Labels:
    source: str
    kind: str
    by_file: dict[str, tuple[str, ...]]  # normalised relative path -> classes
    patients: dict[str, str]  # normalised relative path -> patient id from labels.csv (if any)
    names: tuple[str, ...]
    rows: dict[str, dict[str, str]] = field(default_factory=dict)  # relative path -> label cells (no identifiers)
    columns: tuple[str, ...] = ()  # the label-bearing columns of rows


def _norm(rel: str) -> str:
    return Path(rel.strip().replace("\\", "/")).as_posix().lstrip("./") if rel.strip() else ""


def _read_labels_csv(path: Path) -> _Labels:
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.DictReader(fh))
            columns = [c.strip() for c in (rows[0].keys() if rows else [])]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DatasetError(f"{path}: cannot read labels.csv ({err}); save it as UTF-8 CSV") from err
    if not rows:
        raise DatasetError(f"{path}: labels.csv has no rows; add one row per image (columns file,label)")
    lower = {c.lower(): c for c in columns}
    file_col = lower.get("file") or lower.get("path")
    if file_col is None:
        raise DatasetError(
            f"{path}: labels.csv has no `file` column (columns: {', '.join(columns)}); "
            "add `file` with each image's path relative to the data folder"
        )
    # A coarser patient key wins when a table has one (Kermany: one child as person12_bacteria and
    # person12_virus): the same person under two ids would otherwise straddle the split.
    patient_col = lower.get("patient_id_coarse") or lower.get("patient_id") or lower.get("patient")
    by_file: dict[str, tuple[str, ...]] = {}
    patients: dict[str, str] = {}
    label_columns = tuple(c for c in columns if label_key(c) not in _PRIVATE_COLUMNS)
    label_rows = {_norm(r.get(file_col) or ""): {c: (r.get(c) or "").strip() for c in label_columns} for r in rows}
    label_rows.pop("", None)
    findings = finding_columns(rows, columns)
    listed = list_column(columns)
    if "label" in lower:
        label_col = lower["label"]
        name_col = lower.get("class_name")
        kind, source = "single", "labels.csv (label column)"
        for row in rows:
            value = (row.get(label_col) or "").strip()
            if name_col and (row.get(name_col) or "").strip():
                value = row[name_col].strip()
            rel = _norm(row.get(file_col) or "")
            if rel and value:
                by_file[rel] = (value,)
            if rel and patient_col and (row.get(patient_col) or "").strip():
                patients[rel] = row[patient_col].strip()
    else:
        finding_cols = [c for c in findings if c.lower() not in NON_LABEL_COLUMNS]
        if not finding_cols and listed is None:
            raise DatasetError(
                f"{path}: labels.csv has no `label` column, no 1/0/-1 finding columns and no `finding_labels` column "
                f"(columns: {', '.join(columns)}); add `label` (class name), one column per finding, or "
                "`finding_labels` ('|'-separated findings)"
            )
        kind = "multi"
        source = "labels.csv (finding columns)" if finding_cols else f"labels.csv ({listed} column)"
        names: set[str] = set()
        for row in rows:
            rel = _norm(row.get(file_col) or "")
            if not rel:
                continue
            if finding_cols:
                by_file[rel] = tuple(c for c in finding_cols if (row.get(c) or "").strip() in ("1", "1.0"))
            else:
                by_file[rel] = tuple(f.strip() for f in (row.get(listed) or "").split("|")
                                     if f.strip() and label_key(f) != "no finding")
            names.update(by_file[rel])
            if patient_col and (row.get(patient_col) or "").strip():
                patients[rel] = row[patient_col].strip()
        all_names = tuple(sorted(finding_cols)) if finding_cols else tuple(sorted(names))
        return _Labels(source, kind, by_file, patients, all_names, label_rows, label_columns)
    names_single = tuple(sorted({v[0] for v in by_file.values()}))
    return _Labels(source, kind, by_file, patients, names_single, label_rows, label_columns)


# --------------------------------------------------------------------------- scanning


def _candidate_files(root: Path) -> tuple[list[Path], int]:
    files: list[Path] = []
    ignored = 0
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            path = Path(dirpath) / name
            if path.parent == root and name == LABELS_FILE:
                continue
            if path.suffix.lower() in NON_IMAGE_SUFFIXES:
                ignored += 1
                continue
            files.append(path)
    return files, ignored


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
    path: Path, salt: bytes | str, image_size: int | None, cache: SiteCache | None
) -> tuple[str, dict[str, Any] | None, np.ndarray | None, str | None]:
    """(content hash, meta, pixels, skip reason) for one file, through the cache when there is one."""
    from common.dicom import DicomError

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
    files, ignored = _candidate_files(root)
    unlabelled = False
    if labels is None:
        class_dirs = sorted({f.relative_to(root).parts[0] for f in files if len(f.relative_to(root).parts) > 1})
        if not class_dirs and require_labels:
            raise DatasetError(
                f"{root}: no labels.csv and no class subfolders; add labels.csv (columns file,label) "
                "or put images in one subfolder per class (e.g. NORMAL/, PNEUMONIA/)"
            )
        unlabelled = not class_dirs
        source, kind = ("none (unlabelled)" if unlabelled else "class folders"), "single"
    else:
        source, kind = labels.source, labels.kind

    records: list[ImageRecord] = []
    skipped: list[Skipped] = []
    missing_patient = Counter()
    seen_rel: set[str] = set()
    iterator: Iterable[Path] = files
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(files, desc="reading images", unit="file", leave=False)
    for path in iterator:
        rel = path.relative_to(root).as_posix()
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
        key, meta, pixels, reason = _read_one(path, salt, image_size, cache)
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


# --------------------------------------------------------------------------- split


@dataclass(frozen=True)
class Split:
    """Positions (into Targets.keep order) of the train and validation images."""

    train: np.ndarray
    val: np.ndarray
    train_patients: int
    val_patients: int
    stratified: bool


def split_patients(patients: Sequence[str], strata: Sequence[int], *, val_fraction: float) -> Split:
    """Patient-level split owned by the site: every image of a patient falls on the same side.

    Which side a patient falls on depends only on the patient's salted hash (keyed by the site's
    secret salt, so nobody else can predict it) and the site's own ``val_fraction`` (node config),
    never on anything the coordinator sets (seed, labels, task): patients are ordered within their
    stratum by sha256 of their pseudonym and the first ``val_fraction`` of each stratum validate.
    Stratified by each patient's stratum (e.g. positive if any of their images is), so a small site
    still validates on both classes; a stratum with a single patient trains.
    """
    by_patient: dict[str, list[int]] = defaultdict(list)
    patient_stratum: dict[str, int] = {}
    for i, (p, s) in enumerate(zip(patients, strata, strict=True)):
        by_patient[p].append(i)
        patient_stratum[p] = max(patient_stratum.get(p, s), s)
    val_patients: set[str] = set()
    groups: dict[int, list[str]] = defaultdict(list)
    for p in by_patient:
        groups[patient_stratum[p]].append(p)
    stratified = len(groups) > 1
    for _, members in sorted(groups.items()):
        order = sorted(members, key=_split_rank)
        n_val = int(round(val_fraction * len(order)))
        if len(order) >= 2:
            n_val = min(max(n_val, 1), len(order) - 1)
        else:
            n_val = 0
        val_patients.update(order[:n_val])
    train = [i for p in sorted(by_patient) if p not in val_patients for i in by_patient[p]]
    val = [i for p in sorted(by_patient) if p in val_patients for i in by_patient[p]]
    return Split(
        np.asarray(sorted(train), dtype=np.int64),
        np.asarray(sorted(val), dtype=np.int64),
        len(by_patient) - len(val_patients),
        len(val_patients),
        stratified,
    )


def _split_rank(patient: str) -> str:
    return hashlib.sha256(b"fedxray-split\n" + patient.encode()).hexdigest()


def patient_strata(targets: Targets) -> np.ndarray:
    """A stratum per image for splitting: the class (multiclass), positive/negative otherwise."""
    if targets.task == "multiclass":
        return targets.y.astype(np.int64)
    return (np.nan_to_num(targets.y, nan=0.0).max(axis=1) > 0.5).astype(np.int64)
