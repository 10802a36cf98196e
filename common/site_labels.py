"""A site's labels.csv read into classes per file (moved out of common/dataset.py).

How each label style reads (a label column, a findings list, 1/0/-1/blank finding columns) is
common/labels.py; this module reads the table, keeps its identifier columns out of the label
cells and raises :class:`DatasetError` with the fix when the table cannot be used.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

from common.labels import NON_LABEL_COLUMNS, finding_columns, list_column
from common.labels import key as label_key

# labels.csv columns an ImageRecord never carries (identifiers and file names stay in the table).
_PRIVATE_COLUMNS = frozenset({"file", "path", "patient id", "patient id coarse", "patient", "sha256", "study", "study id",
                              "dicom id", "subject id"})


class DatasetError(ValueError):
    """The site folder cannot be used (nothing readable, bad labels.csv, labels do not fit the run)."""


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
    """labels.csv's path of an image as scan_site names it: '/' separators, no empty or '.' parts."""
    parts = [p for p in rel.strip().replace("\\", "/").split("/") if p not in ("", ".")]
    return "/".join(parts).lstrip("./")


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
