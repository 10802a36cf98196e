"""A site's labels.csv read into classes per file (moved out of common/dataset.py).

How each label style reads (a label column, a findings list, 1/0/-1/blank finding columns) is
common/labels.py; this module reads the table, keeps its identifier columns out of the label
cells and raises :class:`DatasetError` with the fix when the table cannot be used.
"""

from __future__ import annotations

import csv
import difflib
from dataclasses import dataclass, field
from pathlib import Path

from common.labels import NON_LABEL_COLUMNS, finding_columns, list_column
from common.labels import key as label_key

# labels.csv columns an ImageRecord never carries (identifiers and file names stay in the table).
_PRIVATE_COLUMNS = frozenset({"file", "path", "patient id", "patient id coarse", "patient", "sha256", "study", "study id",
                              "dicom id", "subject id"})


class DatasetError(ValueError):
    """The site folder cannot be used (nothing readable, bad labels.csv, labels do not fit the run)."""


# ------------------------------------------------------------------ what a label table is expected to hold

#: The columns fedxray reads a label table by; a header close to one of them (and no such column) is a typo.
KNOWN_COLUMNS = ("file", "path", "label", "class_name", "finding_labels", "patient_id", "patient_id_coarse", "patient")
EXPECTED_COLUMNS = ("`file` (or `path`: each image's path relative to the folder), then `label` (the class name), one "
                    "1/0/-1 column per finding, or `finding_labels` ('|'-separated); optionally `patient_id`")
#: How close (difflib's ratio) a header must be to a known column to be taken for a misspelling of it.
MISSPELT_CUTOFF = 0.8


def misspelt_columns(columns: list[str] | tuple[str, ...]) -> list[tuple[str, str]]:
    """(header, the known column it looks like) for each header that is a near miss of a known column the table
    lacks: `lable` for `label`, `flie` for `file`, `patientid` for `patient_id`."""
    present = {label_key(c) for c in columns}
    known = {label_key(k): k for k in KNOWN_COLUMNS}
    ignored = {label_key(c) for c in NON_LABEL_COLUMNS}
    out = []
    for column in columns:
        k = label_key(column)
        if k in known or k in ignored or not k:
            continue
        match = difflib.get_close_matches(k, list(known), n=1, cutoff=MISSPELT_CUTOFF)
        if match and match[0] not in present:
            out.append((column, known[match[0]]))
    return out


#: Where a label table may have been saved by mistake instead of labels.csv.
_TABLE_SUFFIXES = ("", ".csv", ".tsv", ".txt", ".xls", ".xlsx")


def closest_labels_file(root: Path) -> str | None:
    """The name of a table in ``root`` that looks like a misnamed labels.csv (label.csv, Labels.CSV, labels.txt)."""
    try:
        tables = {p.stem.lower(): p.name for p in root.iterdir()
                  if p.is_file() and p.suffix.lower() in _TABLE_SUFFIXES and p.name != "labels.csv"}
    except OSError:
        return None
    match = difflib.get_close_matches("labels", list(tables), n=1, cutoff=MISSPELT_CUTOFF)
    return tables[match[0]] if match else None


def no_labels_message(root: Path, n_images: int, subfolders: list[str]) -> str:
    """One line for a folder with neither labels.csv nor class subfolders: what is there, what is expected.
    Subfolders are counted, not named: at a hospital they may be named by patient."""
    found = f"{n_images} image file(s) directly in it" + (f" and {len(subfolders)} subfolder(s) without images"
                                                          if subfolders else "")
    near = closest_labels_file(root)
    hint = f"; found {near}: name it labels.csv" if near else ""
    return (f"{root}: no labels.csv and no class subfolders (found {found}){hint}; add labels.csv with columns "
            f"{EXPECTED_COLUMNS}, or put the images in one subfolder per class (e.g. NORMAL/, PNEUMONIA/)")


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
    misspelt = misspelt_columns(columns)
    if misspelt:  # `lable` would pass as a finding named "lable" (0/1 values) or leave the table without labels
        found, meant = misspelt[0]
        raise DatasetError(f"{path}: labels.csv column `{found}` looks like a misspelt `{meant}` (columns found: "
                           f"{', '.join(columns)}; expected: {EXPECTED_COLUMNS}); rename it to `{meant}`")
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
