"""The label columns of a source image set that simulated hospitals keep (NIH findings, Kermany subtype, ...).

A hospital's ``labels.csv`` holds ``file,label`` (the binary class) plus the source table's other
label columns, so that a multilabel or multiclass run over simulated hospitals reads the same
kinds of tables a real site has (common/labels.py): a findings list (``finding_labels``), a
one-class-per-image column such as ``subtype``, and 1/0/-1/blank finding columns. Identifiers,
file names and demographics are never carried.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path

from common.labels import finding_columns, list_column

#: One-class-per-image columns worth keeping beside ``label`` (Kermany: normal / bacteria / virus).
CLASS_COLUMNS = ("subtype",)


def carried_columns(rows: Sequence[Mapping[str, str]]) -> list[str]:
    """The source table's label columns to write into each hospital's labels.csv (beside file,label)."""
    columns = list(rows[0]) if rows else []
    listed = list_column(columns)
    keep = [c for c in columns if c in CLASS_COLUMNS or c == listed]
    return keep + [c for c in finding_columns(rows, columns) if c not in keep]


def add_label_columns(site_dir: Path, extra: Mapping[str, Mapping[str, str]]) -> None:
    """Add the carried columns to a written site's labels.csv (rows keyed by its ``file`` column)."""
    columns = list(dict.fromkeys(c for cells in extra.values() for c in cells))
    if not columns:
        return
    path = Path(site_dir) / "labels.csv"
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        header = list(reader.fieldnames or [])
        rows = list(reader)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(header + columns)
        for row in rows:
            cells = extra.get(row["file"], {})
            writer.writerow([row[c] for c in header] + [cells.get(c, "") for c in columns])
