"""Label tables as hospitals keep them, turned into one run's targets.

A site's ``labels.csv`` may describe its images in any of these ways (docs/tasks.md):

* a class column: ``label`` (a class name, or 0/1 with ``class_name``), or any column the run or
  the site names with ``label-column`` (Kermany's ``subtype``: normal / bacteria / virus);
* NIH ChestX-ray14 style: one ``finding_labels`` column of '|'-separated findings
  ("Effusion|Infiltration"); "No Finding" means every finding is absent;
* CheXpert / MIMIC-CXR style: one column per finding holding 1 (present), 0 (absent), -1
  (uncertain) or nothing (not mentioned). What -1 and blank mean is the run's policy
  (``uncertain`` = ignore | positive | negative, ``blank`` = negative | ignore); *ignore* masks
  the finding for that image out of the loss and the metrics.

A site names findings its own way; its node config ``label-map`` says which of its names is which
of the federation's ("Pleural effusion=Effusion"). A finding the site does not label at all is
masked for all its images (the site trains on the rest), never taken as absent.

Targets: multiclass int64 [N] (class index); binary / multilabel float32 [N, C] with NaN where a
finding is masked. Pure functions over the table's rows; nothing here reads images or logs a path.
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

UNCERTAIN_CHOICES = ("ignore", "positive", "negative")
BLANK_CHOICES = ("negative", "ignore")
# Class names read as "no finding" when a binary or multilabel task needs a negative class.
NEGATIVE_NAMES = frozenset({"normal", "no finding", "no_finding", "negative", "healthy", "0", "false", "no"})
POSITIVE_FLAGS = frozenset({"1", "true", "yes"})
# labels.csv columns that are never findings or classes (identifiers, acquisition, demographics).
NON_LABEL_COLUMNS = frozenset(
    {"file", "path", "patient_id", "patient_id_coarse", "patient", "split", "class_name", "subtype", "sha256", "study",
     "view", "age", "sex", "follow_up", "study_id", "dicom_id", "subject_id", "frontal/lateral", "ap/pa",
     "patient age", "patient gender", "view position"}
)
# Columns of '|'-separated findings (NIH's own CSV calls it "Finding Labels").
LIST_COLUMNS = ("finding_labels", "finding labels", "findings")
NO_FINDING = "no finding"
# The 14 ChestX-ray14 findings: a list-style site knows these even where none of its images has one.
NIH_FINDINGS = frozenset(
    {"atelectasis", "cardiomegaly", "effusion", "infiltration", "mass", "nodule", "pneumonia", "pneumothorax",
     "consolidation", "edema", "emphysema", "fibrosis", "pleural thickening", "hernia"}
)
_FINDING_VALUES = {"1": 1.0, "1.0": 1.0, "0": 0.0, "0.0": 0.0, "-1": -1.0, "-1.0": -1.0, "": None}


class LabelError(ValueError):
    """The label table cannot give the run's targets (the message names the columns and the fix)."""


@functools.lru_cache(maxsize=4096)
def key(name: str) -> str:
    """Comparison key of a class or finding name: case, '_' / '-' and repeated spaces do not matter."""
    return re.sub(r"\s+", " ", name.strip().lower().replace("_", " ").replace("-", " "))


@dataclass(frozen=True)
class LabelPolicy:
    """How a site's table maps to the run's labels: run settings plus the site's own mapping."""

    label_column: str = ""  # the column that holds the class (multiclass) or findings; "" = chosen by the table
    uncertain: str = "ignore"  # what a -1 means: ignore (masked) | positive | negative
    blank: str = "negative"  # what an empty finding cell means: negative | ignore (masked)
    label_map: Mapping[str, str] = field(default_factory=dict)  # key(site name) -> federation name

    def federation_name(self, site_name: str) -> str:
        return self.label_map.get(key(site_name), site_name)


def parse_pos_weight(text: str, n_outputs: int) -> tuple[float, ...]:
    """Loss weight of each output's positives from the run config's ``pos-weight``; () means none.

    "none" (or "") gives (); one number weighs every output's positives by it; comma-separated
    numbers give one weight per output, in the order of the run's labels. The coordinator fixes
    them: a site never derives them from its own label counts (under DP those are not accounted).
    """
    text = str(text).strip().strip("[]()").strip()
    if text.lower() in ("", "none"):
        return ()
    try:
        weights = tuple(float(v) for v in text.split(","))
    except ValueError as err:
        raise LabelError(f"`pos-weight` = {text!r}: give none, one number, or one number per label (e.g. 1,4,6)") from err
    if len(weights) not in (1, n_outputs):
        raise LabelError(f"`pos-weight` = {text!r}: {len(weights)} weights for {n_outputs} labels; give one, or one per label")
    if not all(0.0 < w <= 1000.0 for w in weights):
        raise LabelError(f"`pos-weight` = {text!r}: every weight must lie in (0, 1000]")
    return weights * n_outputs if len(weights) == 1 else weights


def parse_label_map(text: str) -> dict[str, str]:
    """A site's ``label-map``: inline ``site name=federation name`` pairs separated by ';', or a file
    with one pair per line (``=`` or ``,`` between the names; ``#`` starts a comment)."""
    text = (text or "").strip()
    if not text:
        return {}
    path = Path(text).expanduser()
    if "=" not in text and ";" not in text or path.is_file():
        try:
            lines = path.read_text(encoding="utf-8-sig").splitlines()
        except OSError as err:
            raise LabelError(f"label-map {text!r}: cannot read the file ({err.strerror or err}); give a file with one "
                             "`site name = federation name` per line, or the pairs inline separated by ';'") from err
    else:
        lines = text.split(";")
    out: dict[str, str] = {}
    for n, line in enumerate(lines, 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        sep = "=" if "=" in line else ","
        site, _, fed = line.partition(sep)
        if not site.strip() or not fed.strip():
            raise LabelError(f"label-map entry {n} ({line!r}): expected `site name = federation name`")
        out[key(site)] = fed.strip()
    return out


@dataclass(frozen=True)
class Encoded:
    """Targets of the rows that have one, and what the table said about each run label."""

    y: np.ndarray  # multiclass int64 [N]; else float32 [N, C], NaN = masked
    keep: list[int]  # row positions with a target
    dropped: dict[str, int]  # reason -> rows without a target
    source: str  # which column(s) the targets came from
    not_labelled: tuple[str, ...] = ()  # run labels this site does not label (masked for every image)
    uncertain: dict[str, int] = field(default_factory=dict)  # run label -> -1 cells
    blank: dict[str, int] = field(default_factory=dict)  # run label -> empty cells


def finding_columns(rows: Sequence[Mapping[str, str]], columns: Sequence[str]) -> list[str]:
    """Columns that hold only 1 / 0 / -1 / blank (CheXpert, MIMIC-CXR, or plain 0/1 finding columns)."""
    out = []
    for c in columns:
        if key(c) in {key(n) for n in NON_LABEL_COLUMNS} or key(c) == "label" or key(c) in LIST_COLUMNS:
            continue
        values = {(r.get(c) or "").strip() for r in rows}
        if values <= set(_FINDING_VALUES) and values - {""}:
            out.append(c)
    return out


def list_column(columns: Sequence[str]) -> str | None:
    return next((c for c in columns if key(c) in LIST_COLUMNS), None)


def class_value(row: Mapping[str, str], column: str) -> str:
    """The class of a row: ``class_name`` stands in for a numeric ``label`` when the table has both."""
    value = (row.get(column) or "").strip()
    if key(column) == "label":
        name = next((v for k, v in row.items() if key(k) == "class name" and (v or "").strip()), None)
        if name:
            return name.strip()
    return value


def encode(rows: Sequence[Mapping[str, str]], columns: Sequence[str], task: str, labels: Sequence[str],
           policy: LabelPolicy) -> Encoded:
    """Targets for ``task`` / ``labels`` from the table's rows (one per image) under ``policy``."""
    if policy.uncertain not in UNCERTAIN_CHOICES or policy.blank not in BLANK_CHOICES:
        raise LabelError(f"uncertain = {policy.uncertain!r}, blank = {policy.blank!r}: expected uncertain one of "
                         f"{', '.join(UNCERTAIN_CHOICES)} and blank one of {', '.join(BLANK_CHOICES)}")
    wanted = [key(lab) for lab in labels]
    by_key = {key(c): c for c in columns}
    if policy.label_column:
        column = by_key.get(key(policy.label_column))
        if column is None:
            raise LabelError(f"label-column {policy.label_column!r} is not a column of labels.csv (columns: "
                             f"{', '.join(columns)}); name one of them, or leave label-column empty")
        if key(column) in LIST_COLUMNS:
            return _encode_list(rows, column, task, labels, policy)
        if column in finding_columns(rows, [column]) and task != "multiclass":
            return _encode_columns(rows, [column], task, labels, policy)
        return _encode_classes(rows, column, task, labels, policy)
    label_col = by_key.get("label")
    if label_col is not None:
        names = {key(policy.federation_name(class_value(r, label_col))) for r in rows}
        if set(wanted) <= names or task == "multiclass" and len(set(wanted) & names) >= 2:
            return _encode_classes(rows, label_col, task, labels, policy)
    if task == "multiclass":
        for column in columns:  # a class column that knows every class (e.g. subtype)
            if key(column) in {"file", "path", "sha256", "patient id", "patient id coarse", "patient"}:
                continue
            names = {key(policy.federation_name((r.get(column) or "").strip())) for r in rows}
            if set(wanted) <= names:
                return _encode_classes(rows, column, task, labels, policy)
    else:
        findings = finding_columns(rows, columns)
        listed = list_column(columns)
        if findings and (any(key(policy.federation_name(c)) in wanted for c in findings)
                         or (label_col is None and listed is None)):
            return _encode_columns(rows, findings, task, labels, policy)
        if listed is not None and (label_col is None or any(_list_knows(rows, listed, policy, wanted))):
            return _encode_list(rows, listed, task, labels, policy)
    if label_col is not None:
        return _encode_classes(rows, label_col, task, labels, policy)
    if finding_columns(rows, columns):
        return _encode_columns(rows, finding_columns(rows, columns), task, labels, policy)  # says why not
    raise LabelError(f"labels.csv has no column for the run's labels {', '.join(labels)} (columns: "
                     f"{', '.join(columns)}); add a `label` column, one column per finding, or a `finding_labels` "
                     "column, or name the column with label-column")


def _encode_classes(rows: Sequence[Mapping[str, str]], column: str, task: str, labels: Sequence[str],
                    policy: LabelPolicy) -> Encoded:
    """One class per image (a class column or class folders)."""
    wanted = [key(lab) for lab in labels]
    classes = [key(policy.federation_name(class_value(r, column))) for r in rows]
    others = sorted({c for c in classes if c} - set(wanted))
    out: list[np.ndarray | int] = []
    keep: list[int] = []
    dropped: Counter[str] = Counter()
    for i, (row, cls) in enumerate(zip(rows, classes, strict=True)):
        raw = class_value(row, column)
        if not cls:
            dropped[f"no value in column {column!r}"] += 1
            continue
        if task == "multiclass":
            if cls in wanted:
                out.append(wanted.index(cls))
                keep.append(i)
            else:
                dropped[f"class {raw!r} is not among the run's labels"] += 1
            continue
        if cls in wanted or cls in POSITIVE_FLAGS:
            out.append(np.array([1.0 if lab == cls or (cls in POSITIVE_FLAGS and len(wanted) == 1) else 0.0
                                 for lab in wanted], dtype=np.float32))
        elif cls in NEGATIVE_NAMES or (task == "binary" and len(others) == 1):
            out.append(np.zeros(len(wanted), dtype=np.float32))
        else:
            dropped[f"class {raw!r} is neither a run label nor a negative class"] += 1
            continue
        keep.append(i)
    y = np.asarray(out, dtype=np.int64) if task == "multiclass" else _stack(out, len(wanted))
    return Encoded(y, keep, dict(dropped), f"labels.csv column {column!r}" if column != "(folder)" else "class folders")


def _encode_list(rows: Sequence[Mapping[str, str]], column: str, task: str, labels: Sequence[str],
                 policy: LabelPolicy) -> Encoded:
    """NIH style: '|'-separated findings; "No Finding" (or a finding not listed) is absent."""
    if task == "multiclass":
        raise LabelError(f"column {column!r} lists several findings per image: use task multilabel or binary, or "
                         "name a one-class-per-image column with label-column")
    wanted = [key(lab) for lab in labels]
    present = _listed(rows, column, policy)
    known = _list_knows(rows, column, policy, wanted)
    not_labelled = tuple(lab for lab, k in zip(labels, known, strict=True) if not k)
    if not any(known):
        raise LabelError(f"column {column!r} names none of the run's labels {', '.join(labels)}; map the site's names "
                         "to the federation's with the node config label-map")
    out, keep, dropped = [], [], Counter()
    blank = Counter()
    for i, found in enumerate(present):
        if not found and policy.blank == "ignore":
            dropped[f"no value in column {column!r}"] += 1
            continue
        if not found:
            blank.update(labels)
        out.append(np.array([(1.0 if lab in found else 0.0) if k else np.nan for lab, k in zip(wanted, known, strict=True)],
                            dtype=np.float32))
        keep.append(i)
    return Encoded(_stack(out, len(wanted)), keep, dict(dropped), f"labels.csv column {column!r} (findings list)",
                   not_labelled, {}, dict(blank))


def _listed(rows: Sequence[Mapping[str, str]], column: str, policy: LabelPolicy) -> list[set[str]]:
    return [{key(policy.federation_name(f)) for f in (r.get(column) or "").split("|") if f.strip()} for r in rows]


def _list_knows(rows: Sequence[Mapping[str, str]], column: str, policy: LabelPolicy, wanted: list[str]) -> list[bool]:
    """Per run label: does this findings list label it (named in some row, or one of the NIH findings)?"""
    present = _listed(rows, column, policy)
    seen = set().union(*present) if present else set()
    return [lab in seen or lab in NIH_FINDINGS for lab in wanted]


def _encode_columns(rows: Sequence[Mapping[str, str]], findings: Sequence[str], task: str, labels: Sequence[str],
                    policy: LabelPolicy) -> Encoded:
    """CheXpert / MIMIC style: a column per finding, 1 / 0 / -1 / blank, -1 and blank per the policy."""
    if task == "multiclass":
        raise LabelError("labels.csv has a column per finding: use task multilabel or binary, not multiclass, or name "
                         "a one-class-per-image column with label-column")
    column_of = {key(policy.federation_name(c)): c for c in findings}
    cols = [column_of.get(key(lab)) for lab in labels]
    not_labelled = tuple(lab for lab, c in zip(labels, cols, strict=True) if c is None)
    if len(not_labelled) == len(labels):
        raise LabelError(f"labels.csv has no column for {', '.join(labels)} (finding columns: {', '.join(findings)}); "
                         "map the site's names to the federation's with the node config label-map")
    uncertain_value = {"ignore": np.nan, "positive": 1.0, "negative": 0.0}[policy.uncertain]
    blank_value = 0.0 if policy.blank == "negative" else np.nan
    uncertain, blank = Counter(), Counter()
    out, keep, dropped = [], [], Counter()
    for i, row in enumerate(rows):
        vec = np.full(len(labels), np.nan, dtype=np.float32)
        for j, (lab, col) in enumerate(zip(labels, cols, strict=True)):
            if col is None:
                continue
            value = _FINDING_VALUES.get((row.get(col) or "").strip())
            if value is None:
                blank[lab] += 1
                vec[j] = blank_value
            elif value < 0:
                uncertain[lab] += 1
                vec[j] = uncertain_value
            else:
                vec[j] = value
        if np.all(np.isnan(vec)):
            dropped["no known value for any of the run's findings (uncertain or blank, masked)"] += 1
            continue
        out.append(vec)
        keep.append(i)
    used = [c for c in cols if c is not None]
    return Encoded(_stack(out, len(labels)), keep, dict(dropped), f"labels.csv finding columns ({', '.join(used)})",
                   not_labelled, dict(uncertain), dict(blank))


def _stack(rows: list, width: int) -> np.ndarray:
    return np.stack(rows).astype(np.float32) if rows else np.zeros((0, width), dtype=np.float32)
