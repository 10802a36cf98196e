"""`fl-client check`: what a hospital sees before it joins a federation.

Reads the site folder (and nothing else), then reports what was found: images and patients per
class, skipped files grouped by reason, the acquisition mix (modality, photometric interpretation,
matrix size, bit depth, transfer syntax) and the patient-level split. It never prints a patient
identifier; file paths of skipped files are shown only when the operator asks (``--list-skipped``),
on the site's own terminal.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.dataset import (
    DatasetError,
    SiteIndex,
    Split,
    Targets,
    encode_targets,
    patient_strata,
    split_patients,
)
from common.labels import LabelPolicy
from common.site_labels import EXPECTED_COLUMNS, closest_labels_file, no_labels_message

#: Fewer validation patients with a finding (or class) than this cannot validate it: the site's AUC for it is noise.
MIN_VALIDATION_POSITIVES = 5


@dataclass
class CheckReport:
    """The summary as data (for tests and --json) plus its text rendering."""

    summary: dict[str, Any]
    skipped_paths: list[tuple[str, str]]  # (relative path, reason): local use only

    def render(self, *, list_skipped: bool = False) -> str:
        return render_summary(self.summary, self.skipped_paths if list_skipped else None)


def _size_bucket(rows: int, cols: int) -> str:
    return f"{rows}x{cols}"


def summarize(
    index: SiteIndex,
    *,
    task: str | None = None,
    labels: tuple[str, ...] | None = None,
    val_fraction: float = 0.2,
    policy: LabelPolicy | None = None,
) -> CheckReport:
    """Build the check summary for a scanned site. No identifiers, only counts and categories."""
    per_class_images: Counter[str] = Counter()
    per_class_patients: dict[str, set[str]] = {}
    for rec in index.records:
        for cls in rec.classes or ("(unlabelled)" if index.label_source.startswith("none") else "(no finding)",):
            per_class_images[cls] += 1
            per_class_patients.setdefault(cls, set()).add(rec.patient)
    mix: dict[str, Counter[str]] = {k: Counter() for k in ("format", "modality", "photometric", "matrix", "bits_stored", "transfer_syntax")}
    for rec in index.records:
        m = rec.meta
        mix["format"][m.get("format", "?")] += 1
        mix["modality"][m.get("modality") or "(none)"] += 1
        mix["photometric"][m.get("photometric") or "?"] += 1
        mix["matrix"][_size_bucket(int(m.get("rows", 0)), int(m.get("cols", 0)))] += 1
        mix["bits_stored"][str(m.get("bits_stored", "?"))] += 1
        mix["transfer_syntax"][m.get("transfer_syntax_name") or m.get("transfer_syntax") or "?"] += 1
    patient_sources = Counter(rec.patient_source for rec in index.records)
    summary: dict[str, Any] = {
        "images": len(index.records),
        "patients": len({r.patient for r in index.records}),
        "label_source": index.label_source,
        "classes": {
            cls: {"images": per_class_images[cls], "patients": len(per_class_patients[cls])}
            for cls in sorted(per_class_images)
        },
        "skipped": dict(Counter(s.reason for s in index.skipped).most_common()),
        "skipped_total": len(index.skipped),
        "ignored_non_image_files": index.ignored,
        "patient_key": dict(patient_sources),
        "mix": {k: dict(v.most_common()) for k, v in mix.items()},
    }
    summary["labels_problem"] = labels_problem(index, summary["classes"])
    if task and labels:
        try:
            targets = encode_targets(index, task, labels, policy)
        except DatasetError as err:
            summary["split"] = {"error": str(err)}
        else:
            kept = [index.records[int(i)] for i in targets.keep]
            split = split_patients(
                [r.patient for r in kept], patient_strata(targets), val_fraction=val_fraction
            )
            strata = patient_strata(targets)
            summary["split"] = {
                "task": task,
                "labels": list(labels),
                "train_images": int(split.train.size),
                "val_images": int(split.val.size),
                "train_patients": split.train_patients,
                "val_patients": split.val_patients,
                "train_positive": int(np.sum(strata[split.train])) if task != "multiclass" else None,
                "val_positive": int(np.sum(strata[split.val])) if task != "multiclass" else None,
                "stratified": split.stratified,
                "left_out": targets.dropped,
                "label_source": targets.source,
                "per_label": per_label_counts(targets, split, [r.patient for r in kept]),
                "not_labelled": list(targets.not_labelled),
                "uncertain": targets.uncertain,
                "blank": targets.blank,
            }
            summary["split"]["too_few_to_validate"] = [
                lab for lab, c in summary["split"]["per_label"].items() if c["val_patients"] < MIN_VALIDATION_POSITIVES
                and lab not in targets.not_labelled]
    skipped_paths = sorted((_rel(index.root, s.path), s.reason) for s in index.skipped)
    return CheckReport(summary, skipped_paths)


#: From this many class folders on, all of them holding a single patient means they are patient folders.
PATIENT_FOLDER_CLASSES = 3


def labels_problem(index: SiteIndex, classes: dict[str, dict[str, int]]) -> str | None:
    """What is wrong with where the labels come from, in one line (None when nothing is): no labels yet, or
    class folders that are patient (or study) folders, which would train as one class per patient."""
    if index.label_source.startswith("none"):
        return no_labels_message(index.root, len(index.records), [])
    if (index.label_source == "class folders" and len(classes) >= PATIENT_FOLDER_CLASSES
            and all(c["patients"] == 1 for c in classes.values())):
        near = closest_labels_file(index.root)
        return (f"each of the {len(classes)} subfolders taken as classes holds a single patient: they look like patient "
                f"or study folders, not classes{f' (found {near}: name it labels.csv)' if near else ''}; add labels.csv "
                f"with columns {EXPECTED_COLUMNS}, or put the images in one subfolder per class")
    return None


def per_label_counts(targets: Targets, split: Split, patients: list[str]) -> dict[str, dict[str, int]]:
    """Per class / finding: positive images and patients (all, train, validation) and masked images."""
    y = targets.y
    out: dict[str, dict[str, int]] = {}
    side = np.full(len(patients), "train", dtype=object)
    side[split.val] = "val"
    for j, label in enumerate(targets.labels):
        if targets.task == "multiclass":
            pos, masked = y == j, np.zeros(len(y), dtype=bool)
        else:
            pos, masked = np.nan_to_num(y[:, j], nan=0.0) > 0.5, np.isnan(y[:, j])
        counts = {"images": int(pos.sum()), "patients": len({patients[i] for i in np.flatnonzero(pos)}),
                  "masked_images": int(masked.sum())}
        for part in ("train", "val"):
            hit = np.flatnonzero(pos & (side == part))
            counts[f"{part}_images"] = int(hit.size)
            counts[f"{part}_patients"] = len({patients[i] for i in hit})
        out[label] = counts
    return out


def _rel(root: Path, path: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.name


def render_summary(summary: dict[str, Any], skipped_paths: list[tuple[str, str]] | None = None) -> str:
    """Plain-text report for a terminal or a ticket (no identifiers)."""
    out: list[str] = []
    out.append(
        f"usable images: {summary['images']}   patients: {summary['patients']}   labels from: {summary['label_source']}"
    )
    if summary.get("labels_problem"):
        out.append(f"LABELS: {summary['labels_problem']}")
    out.append("")
    out.append(f"  {'class':<24}{'images':>8}{'patients':>10}")
    for cls, c in summary["classes"].items():
        out.append(f"  {cls:<24}{c['images']:>8}{c['patients']:>10}")
    pk = summary["patient_key"]
    if set(pk) - {"patient"}:
        out.append("")
        out.append(f"  patient key: {', '.join(f'{k} {v}' for k, v in pk.items())}  (study/file = no PatientID)")
    out.append("")
    out.append(f"skipped files: {summary['skipped_total']}")
    for reason, n in summary["skipped"].items():
        out.append(f"  {n:>5} x {reason}")
    if skipped_paths:
        out.append("  (local paths, do not share outside the hospital)")
        for rel, reason in skipped_paths:
            out.append(f"        {rel}: {reason}")
    elif summary["skipped_total"]:
        out.append("  (run again with --list-skipped to see which files, on this terminal only)")
    if summary["ignored_non_image_files"]:
        out.append(f"  ({summary['ignored_non_image_files']} non-image files such as .txt/.csv ignored)")
    out.append("")
    out.append("acquisition mix:")
    for key, counts in summary["mix"].items():
        items = ", ".join(f"{k} {v}" for k, v in list(counts.items())[:6])
        more = f", +{len(counts) - 6} more" if len(counts) > 6 else ""
        out.append(f"  {key:<16}{items}{more}")
    split = summary.get("split")
    if split:
        out.append("")
        if "error" in split:
            out.append(f"split: cannot encode labels for this run: {split['error']}")
        else:
            strat = "stratified" if split["stratified"] else "not stratified (one class only)"
            out.append(f"patient-level split ({split['task']}: {', '.join(split['labels'])}; {strat}):")
            pos_t = f", {split['train_positive']} positive" if split["train_positive"] is not None else ""
            pos_v = f", {split['val_positive']} positive" if split["val_positive"] is not None else ""
            out.append(f"  train  {split['train_images']:>6} images  {split['train_patients']:>5} patients{pos_t}")
            out.append(f"  val    {split['val_images']:>6} images  {split['val_patients']:>5} patients{pos_v}")
            for reason, n in split["left_out"].items():
                out.append(f"  left out: {n} x {reason}")
            out.extend(_render_labels(split))
    return "\n".join(out)


def _render_labels(split: dict[str, Any]) -> list[str]:
    """Per class / finding counts for the run's task (positives: images / patients; masked images)."""
    per = split.get("per_label") or {}
    if not per:
        return []
    what = "class" if split["task"] == "multiclass" else "finding"
    out = ["", f"per {what} (labels from {split.get('label_source') or '?'}; images / patients):",
           f"  {what:<24}{'all':>12}{'train':>12}{'val':>12}{'masked':>8}"]
    for label, c in per.items():
        out.append(f"  {label:<24}{c['images']:>6} / {c['patients']:<4}{c['train_images']:>6} / {c['train_patients']:<4}"
                   f"{c['val_images']:>6} / {c['val_patients']:<4}{c['masked_images']:>8}")
    if split.get("not_labelled"):
        out.append(f"  not labelled at this site (masked, never taken as absent): {', '.join(split['not_labelled'])}")
    for name, counts in (("uncertain (-1)", split.get("uncertain")), ("blank", split.get("blank"))):
        if counts:
            out.append(f"  {name} cells: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    if split.get("too_few_to_validate"):
        out.append(f"  too few positives to validate (< {MIN_VALIDATION_POSITIVES} validation patients): "
                   f"{', '.join(split['too_few_to_validate'])}")
    return out
