"""Hospitals from a real labelled image set: patients partitioned into sites, written as DICOM.

Each image goes through its hospital's acquisition profile (simulations/acquisition.py) under a
pseudonymous PatientID; the real ids and file names never reach the output. Same arguments and
seed give byte-identical files.
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import logging
import re
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

import numpy as np

from common.site_labels import misspelt_columns
from simulations import partition as part
from simulations.acquisition import deterministic_uid, site_profiles, write_radiograph
from simulations.hospital_layout import (
    HOLDOUT_SITE,
    LABELS_FILE,
    MANIFEST_FILE,
    HospitalsManifest,
    SimulationError,
    SiteSummary,
    prepare_out,
    progress_bar,
    site_name,
    site_summary,
    write_labels,
)
from simulations.label_columns import add_label_columns, carried_columns

log = logging.getLogger(__name__)

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclass(frozen=True)
class _SourceImage:
    path: Path
    label: int
    patient: str  # the real patient key: used for grouping only, never written
    view: str
    extra: tuple[tuple[str, str], ...] = ()  # label columns kept in the site's labels.csv (simulations/label_columns.py)


def make_hospitals_from_images(
    images_dir: Path,
    out: Path,
    n_sites: int,
    *,
    partition: str = "iid",
    alpha: float = 0.5,
    holdout_fraction: float = 0.0,
    seed: int = 0,
    max_images: int | None = None,
    image_size: int | None = None,
    progress: bool = False,
) -> HospitalsManifest:
    """Turn a labelled image set (labels.csv or NORMAL/PNEUMONIA folders) into DICOM hospitals.

    Patients (never single images) are split by ``partition`` into ``n_sites`` hospitals, after
    an optional stratified hold-out of ``holdout_fraction`` of the patients (``<out>/holdout``).
    Each image is written through its hospital's acquisition profile with a pseudonymous
    PatientID (keyed hash of the real id; the real ids and file names never reach ``out``).
    ``image_size`` shrinks larger images to image_size x image_size first (bilinear, aspect not
    kept, as interface 3); ``max_images`` takes a class-proportional subset of whole patients.
    """
    from common.images import read_image, resize_image  # torch import: only when needed

    images_dir, out = Path(images_dir), Path(out)
    part.check_scheme(partition)
    if n_sites < 1 or (image_size is not None and image_size < 8) or (max_images is not None and max_images < 2):
        raise SimulationError(
            f"n_sites={n_sites}, image_size={image_size}, max_images={max_images}: need n_sites >= 1, image_size >= 8 and max_images >= 2"
        )
    images, classes = load_image_set(images_dir)
    if max_images is not None:
        images = _subset(images, max_images, seed)
    by_patient: dict[str, list[_SourceImage]] = defaultdict(list)
    for img in images:
        by_patient[img.patient].append(img)
    patient_class = {p: max(i.label for i in imgs) for p, imgs in by_patient.items()}  # positive if any image is
    held, rest = part.holdout_split(patient_class, holdout_fraction, seed=seed)
    groups = part.partition_patients({p: patient_class[p] for p in rest}, n_sites, scheme=partition, alpha=alpha, seed=seed)
    pseudonyms = pseudonymise(list(by_patient), source_prefix(images_dir), seed)
    profiles = site_profiles(n_sites + 1, seed)  # the last one is the hold-out's
    plan = [(site_name(i), profiles[i], groups[i]) for i in range(n_sites)]
    if held:
        plan.append((HOLDOUT_SITE, profiles[n_sites], held))
    prepare_out(out)
    bar = progress_bar(len(images), progress, "images -> DICOM")
    summaries: list[SiteSummary] = []
    for name, profile, patients in plan:
        rows: list[tuple[str, str]] = []
        extra: dict[str, dict[str, str]] = {}
        for patient in sorted(patients, key=lambda p: pseudonyms[p]):
            pid = pseudonyms[patient]
            for k, img in enumerate(sorted(by_patient[patient], key=lambda i: i.path.as_posix())):
                pixels = read_image(img.path)
                if image_size is not None and max(pixels.shape) > image_size:
                    pixels = resize_image(pixels, image_size)
                rel = f"{pid}/study-{k + 1}/1.dcm"
                key = _keyed_hash(seed, img.path.relative_to(images_dir).as_posix())
                write_radiograph(
                    out / name / rel,
                    pixels,
                    profile,
                    patient_id=pid,
                    patient_name=f"{pid.split('-')[0]}^{pid.split('-')[1]}",
                    study_uid=deterministic_uid("study", key),
                    view=img.view,
                    seed=int(key[:15], 16),
                    study_date=(date(2023, 1, 1) + timedelta(days=int(key[15:20], 16) % 365)).strftime("%Y%m%d"),
                )
                rows.append((rel, classes[img.label]))
                extra[rel] = dict(img.extra)
                if bar is not None:
                    bar.update(1)
        write_labels(out / name, rows)
        add_label_columns(out / name, extra)
        patients_per_class = Counter(classes[patient_class[p]] for p in patients)
        summaries.append(site_summary(name, rows, patients_per_class, 0, profile))
    if bar is not None:
        bar.close()
    manifest = HospitalsManifest(
        source=f"images:{images_dir.name}",
        seed=seed,
        partition=partition,
        alpha=alpha,
        classes=list(classes),
        sites=[s for s in summaries if s.name != HOLDOUT_SITE],
        holdout=next((s for s in summaries if s.name == HOLDOUT_SITE), None),
        image_size=image_size,
        notes=[f"holdout_fraction={holdout_fraction}", f"max_images={max_images}"],
    )
    manifest.save(out / MANIFEST_FILE)
    log.info("wrote %d hospitals from %d images of %s to %s", n_sites, len(images), images_dir.name, out)
    return manifest


def load_image_set(images_dir: Path) -> tuple[list[_SourceImage], list[str]]:
    """Read an image set's labels: ``labels.csv`` (path, label, [class_name], [patient_id]) or
    class subfolders (patient = file stem then). Returns the images and the class names by label.

    ``patient_id_coarse`` (Kermany) is preferred over ``patient_id`` when present: it groups
    ``person12_bacteria`` with ``person12_virus``, so a possibly shared child never straddles a split.
    """
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise SimulationError(f"{images_dir}: image folder not found; pass a folder with labels.csv or class subfolders")
    labels_csv = images_dir / LABELS_FILE
    if labels_csv.is_file():
        return _from_labels_csv(images_dir, labels_csv)
    return _from_class_folders(images_dir)


def _from_labels_csv(root: Path, labels_csv: Path) -> tuple[list[_SourceImage], list[str]]:
    with open(labels_csv, newline="", encoding="utf-8-sig") as fh:
        rows = list(csv.DictReader(fh))
    columns = set(rows[0]) if rows else set()
    path_col = "path" if "path" in columns else "file"
    if not rows or path_col not in columns or "label" not in columns:
        near = "".join(f"; `{found}` looks like a misspelt `{meant}`" for found, meant in misspelt_columns(sorted(columns)))
        raise SimulationError(f"{labels_csv}: need columns path (or file) and label; found {sorted(columns)}{near}")
    patient_col = next((c for c in ("patient_id_coarse", "patient_id") if c in columns), None)
    if patient_col is None:
        log.warning("%s has no patient_id column: each file is its own patient (splits may leak)", labels_csv.name)
    names: dict[int, str] = {}
    images, missing = [], 0
    carried = carried_columns(rows)
    for row in rows:
        path = root / row[path_col]
        if not path.is_file():
            missing += 1
            continue
        label = int(row["label"])
        name = (row.get("class_name") or _class_from_folder(path.parent.name) or str(label)).strip().upper()
        if names.setdefault(label, name) != name:
            raise SimulationError(f"{labels_csv}: label {label} is both {names[label]!r} and {name!r}; fix class_name")
        patient = row[patient_col] if patient_col else path.stem
        view = (row.get("view") or "").strip().upper()
        images.append(_SourceImage(path, label, patient, view if view in ("PA", "AP") else "",
                                   tuple((c, (row.get(c) or "").strip()) for c in carried)))
    if missing:
        log.warning("%d files listed in %s are missing and were left out", missing, labels_csv.name)
    return _checked(images, names, labels_csv)


def _from_class_folders(root: Path) -> tuple[list[_SourceImage], list[str]]:
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in _IMAGE_SUFFIXES and p.is_file())
    folders = sorted({p.parent.name for p in files}, key=lambda n: (0 if "normal" in n.lower() else 1, n.upper()))
    log.warning("%s has no labels.csv: classes from folders %s, each file stem taken as its own patient", root.name, folders)
    names = {i: _class_from_folder(f).upper() for i, f in enumerate(folders)}
    index = {f: i for i, f in enumerate(folders)}
    images = [_SourceImage(p, index[p.parent.name], p.stem, "") for p in files]
    return _checked(images, names, root)


def _checked(images: list[_SourceImage], names: dict[int, str], where: Path) -> tuple[list[_SourceImage], list[str]]:
    if not images:
        raise SimulationError(f"{where}: no readable image entries (PNG/JPEG); check the folder")
    if sorted(names) != list(range(len(names))) or len(names) < 2:
        raise SimulationError(f"{where}: labels must be 0..C-1 with C >= 2, found {sorted(names)}")
    return images, [names[i] for i in range(len(names))]


def _class_from_folder(folder: str) -> str:
    return re.sub(r"^\d+_", "", folder)


def _subset(images: list[_SourceImage], max_images: int, seed: int) -> list[_SourceImage]:
    """Whole patients, interleaved class by class in proportion, until ``max_images`` is reached."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5B]))
    by_patient: dict[str, list[_SourceImage]] = defaultdict(list)
    for img in images:
        by_patient[img.patient].append(img)
    by_class: dict[int, list[str]] = defaultdict(list)
    for patient in sorted(by_patient):
        by_class[max(i.label for i in by_patient[patient])].append(patient)
    order: list[tuple[float, str]] = []
    for members in by_class.values():
        for rank, i in enumerate(rng.permutation(len(members))):
            order.append(((rank + 0.5) / len(members), members[i]))
    chosen: list[_SourceImage] = []
    for _, patient in sorted(order):
        if len(chosen) + len(by_patient[patient]) <= max_images:
            chosen.extend(by_patient[patient])
    return chosen


def pseudonymise(patients: Iterable[str], prefix: str, seed: int) -> dict[str, str]:
    """Real patient key -> ``PREFIX-xxxxxxxx`` (keyed hash, lengthened until there is no collision).

    A pseudonym, not anonymisation: anyone with the seed and a candidate id can recompute it.
    That is fine for public research sets; do not feed real hospital ids through it.
    """
    patients = sorted(patients)
    for length in (8, 10, 12, 16, 64):
        ids = {p: f"{prefix}-{_keyed_hash(seed, 'patient:' + p)[:length]}" for p in patients}
        if len(set(ids.values())) == len(ids):
            return ids
    raise SimulationError("pseudonym collision even with a full hash; the input has duplicate patient keys")


def _keyed_hash(seed: int, value: str) -> str:
    """HMAC-SHA256 keyed by the seed: stable for a seed, not a plain hash of the real id."""
    return hmac.new(f"fedxray-simulation-{seed}".encode(), value.encode(), hashlib.sha256).hexdigest()


def source_prefix(images_dir: Path) -> str:
    """Short tag of the image set for pseudonymous PatientIDs: KER (Kermany), NIH, else 3 letters."""
    name = images_dir.name.lower()
    known = {"kermany": "KER", "nih": "NIH"}
    for key, prefix in known.items():
        if key in name:
            return prefix
    letters = re.sub(r"[^A-Za-z]", "", images_dir.name).upper()
    return (letters[:3] or "IMG").ljust(3, "X")
