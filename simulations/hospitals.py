"""Folders of DICOM files that look like several hospitals (synthetic, or from a real image set).

Both builders write the same layout, which is what a hospital's ``fl-client`` reads (contract 2)::

    <out>/manifest.json                      sites, class counts, profiles, seed (no identifiers)
    <out>/<site>/labels.csv                  file (relative to the site folder), label (class name)
    <out>/<site>/<patient>/<study>/<n>.dcm   the radiographs; the label is never in the path
    <out>/holdout/...                        optional common test set, same layout

Each site writes through its own ``AcquisitionProfile`` (simulations.acquisition), so sites differ
in how their pixels are stored as well as in size and class mix (simulations.partition). Same
arguments and seed give byte-identical files.
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import json
import logging
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from simulations import partition as part
from simulations.acquisition import (
    CORRUPT_KINDS,
    AcquisitionProfile,
    deterministic_uid,
    site_profiles,
    write_corrupt_file,
    write_radiograph,
)
from simulations.phantom import follow_up, render_phantom, sample_anatomy, sample_opacity

log = logging.getLogger(__name__)

SYNTHETIC_CLASSES = ("normal", "opacity")
LABELS_FILE = "labels.csv"
MANIFEST_FILE = "manifest.json"
HOLDOUT_SITE = "holdout"
AP_SHARE = 0.2  # share of synthetic studies taken AP (bedside) rather than PA
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class SimulationError(ValueError):
    """Arguments or an input image set that cannot make hospitals; the message says what to change."""


@dataclass
class SiteSummary:
    """What one simulated site holds (counts only: no identifiers, no file names)."""

    name: str
    n_patients: int
    n_images: int
    images_per_class: dict[str, int]
    patients_per_class: dict[str, int]
    n_corrupt: int
    profile: dict[str, Any]


@dataclass
class HospitalsManifest:
    """``<out>/manifest.json``: how the hospitals were made; safe to share."""

    source: str  # "synthetic" or "images:<folder name>"
    seed: int
    partition: str
    alpha: float
    classes: list[str]
    sites: list[SiteSummary]
    holdout: SiteSummary | None = None
    image_size: int | None = None
    version: int = 1
    notes: list[str] = field(default_factory=list)

    @property
    def site_names(self) -> list[str]:
        return [s.name for s in self.sites]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> HospitalsManifest:
        data = json.loads(Path(path).read_text())
        data["sites"] = [SiteSummary(**s) for s in data["sites"]]
        data["holdout"] = SiteSummary(**data["holdout"]) if data.get("holdout") else None
        return cls(**data)


# --------------------------------------------------------------------------- synthetic


def make_synthetic_hospitals(
    out: Path,
    n_sites: int = 3,
    *,
    patients_per_site: int | Sequence[int] = 40,
    images_per_patient: tuple[int, int] = (1, 3),
    prevalence: float | Sequence[float] = 0.4,
    partition: str = "label-skew",
    corrupt_per_site: int = 2,
    seed: int = 0,
    progress: bool = False,
    alpha: float = 0.5,
) -> HospitalsManifest:
    """Write ``n_sites`` hospitals of synthetic chest radiographs (normal / opacity) under ``out``.

    ``patients_per_site`` and ``prevalence`` given per site are used as they are; given as one
    number they are the mean, and ``partition`` (with ``alpha``) decides how sizes and prevalence
    vary between sites. Patients are positive or negative as a whole; each has 1..n follow-up
    studies. ``corrupt_per_site`` unreadable files (truncated, non-image, garbage) are added to
    each site and listed in labels.csv like the others (an export lists what it meant to write),
    so a reader meets them while decoding; the manifest counts them apart (``n_corrupt``), and its
    ``n_images`` / ``images_per_class`` count readable images only.
    """
    out = Path(out)
    table = _synthetic_plan(n_sites, patients_per_site, prevalence, partition, alpha, seed, images_per_patient, corrupt_per_site)
    _prepare_out(out)
    profiles = site_profiles(n_sites, seed)
    summaries = []
    bar = _progress(int(table.sum()) * (images_per_patient[0] + images_per_patient[1]) // 2, progress, "synthetic images")
    for index, profile in enumerate(profiles):
        summaries.append(_write_synthetic_site(out, index, profile, table[index], images_per_patient, corrupt_per_site, seed, bar))
    if bar is not None:
        bar.close()
    manifest = HospitalsManifest(
        source="synthetic", seed=seed, partition=partition, alpha=alpha, classes=list(SYNTHETIC_CLASSES), sites=summaries
    )
    manifest.save(out / MANIFEST_FILE)
    log.info("wrote %d synthetic hospitals (%d images) to %s", n_sites, sum(s.n_images for s in summaries), out)
    return manifest


def _synthetic_plan(
    n_sites: int,
    patients_per_site: int | Sequence[int],
    prevalence: float | Sequence[float],
    partition: str,
    alpha: float,
    seed: int,
    images_per_patient: tuple[int, int],
    corrupt_per_site: int,
) -> np.ndarray:
    """Patients per (site, class) as an int table [n_sites, 2]; checks every argument first."""
    problems = []
    if partition not in part.SCHEMES:
        problems.append(f"partition {partition!r} (expected one of {', '.join(part.SCHEMES)})")
    if n_sites < 1:
        problems.append(f"n_sites {n_sites} (expected >= 1)")
    sizes_given = not isinstance(patients_per_site, int)
    prev_given = not isinstance(prevalence, (int, float))
    for label, values, given in (("patients_per_site", patients_per_site, sizes_given), ("prevalence", prevalence, prev_given)):
        if given and len(values) != n_sites:  # type: ignore[arg-type]
            problems.append(f"{label} has {len(values)} values for {n_sites} sites")  # type: ignore[arg-type]
    sizes_list = list(patients_per_site) if sizes_given else [patients_per_site]  # type: ignore[arg-type]
    prev_list = list(prevalence) if prev_given else [prevalence]  # type: ignore[arg-type]
    if any(int(n) < 2 for n in sizes_list):
        problems.append(f"patients_per_site {patients_per_site} (each site needs >= 2 patients)")
    if any(not 0.0 <= float(p) <= 1.0 for p in prev_list):
        problems.append(f"prevalence {prevalence} (expected values in [0, 1])")
    lo, hi = images_per_patient
    if not 1 <= lo <= hi:
        problems.append(f"images_per_patient {images_per_patient} (expected 1 <= min <= max)")
    if corrupt_per_site < 0:
        problems.append(f"corrupt_per_site {corrupt_per_site} (expected >= 0)")
    if alpha <= 0:
        problems.append(f"alpha {alpha} (expected > 0)")
    if problems:
        raise SimulationError("cannot make synthetic hospitals: " + "; ".join(problems))

    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x51]))
    if sizes_given:
        sizes = np.asarray(sizes_list, dtype=np.int64)
    else:
        total = int(patients_per_site) * n_sites  # type: ignore[arg-type]
        sizes = part.site_sizes(total, n_sites, skewed=part.quantity_skewed(partition), alpha=alpha, min_size=6, rng=rng)
    if prev_given:
        positives = np.rint(sizes * np.asarray(prev_list, dtype=np.float64)).astype(np.int64)
        return np.stack([sizes - positives, positives], axis=1)
    n_pos = int(round(float(prevalence) * int(sizes.sum())))  # type: ignore[arg-type]
    counts = [int(sizes.sum()) - n_pos, n_pos]
    return part.class_table(counts, sizes, skewed=part.label_skewed(partition), alpha=alpha, min_per_class=3, rng=rng)


def _write_synthetic_site(
    out: Path,
    index: int,
    profile: AcquisitionProfile,
    counts: np.ndarray,
    images_per_patient: tuple[int, int],
    corrupt_per_site: int,
    seed: int,
    bar: Any,
) -> SiteSummary:
    name, code = site_name(index), _site_code(index)
    root = out / name
    rng = np.random.default_rng(np.random.SeedSequence([seed, index, 0x517E]))
    labels = np.array([0] * int(counts[0]) + [1] * int(counts[1]))[rng.permutation(int(counts.sum()))]
    rows: list[tuple[str, str]] = []
    for p, label in enumerate(labels.tolist()):
        patient_id = f"SIM-{code}-{p + 1:04d}"
        prng = np.random.default_rng(np.random.SeedSequence([seed, index, p, 0xA7]))
        anatomy = sample_anatomy(prng)
        opacity = sample_opacity(prng) if label else None
        first_day = date(2023, 1, 1) + timedelta(days=int(prng.integers(0, 365)))
        for k in range(int(prng.integers(images_per_patient[0], images_per_patient[1] + 1))):
            body, lesion = (anatomy, opacity) if k == 0 else follow_up(anatomy, opacity, prng)
            view = "AP" if prng.random() < AP_SHARE else "PA"
            image = render_phantom(body, profile.matrix, prng, opacity=lesion, view=view)
            rel = f"{patient_id}/study-{k + 1}/1.dcm"
            write_radiograph(
                root / rel,
                image,
                profile,
                patient_id=patient_id,
                patient_name=f"SYNTHETIC^{code}{p + 1:04d}",
                study_uid=deterministic_uid("study", str(seed), name, patient_id, str(k)),
                view=view,
                seed=_derive_seed(seed, name, rel),
                study_date=(first_day + timedelta(days=30 * k)).strftime("%Y%m%d"),
                institution=f"Synthetic Hospital {code}",
            )
            rows.append((rel, SYNTHETIC_CLASSES[label]))
            if bar is not None:
                bar.update(1)
    corrupt = _write_corrupt_files(root, code, index, corrupt_per_site, template=root / rows[0][0], seed=seed)
    _write_labels(root, rows + corrupt)
    patients = Counter(SYNTHETIC_CLASSES[label] for label in labels.tolist())
    return _summary(name, rows, patients, len(corrupt), profile)


def _write_corrupt_files(root: Path, code: str, index: int, n: int, *, template: Path, seed: int) -> list[tuple[str, str]]:
    """Corrupt files named and labelled like real ones (a reader cannot tell them by path or
    labels.csv, only by decoding); kinds rotate by site. Returns their labels.csv rows."""
    rows = []
    for j in range(n):
        kind = CORRUPT_KINDS[(index + j) % len(CORRUPT_KINDS)]
        rel = f"SIM-{code}-{9001 + j}/study-1/1.dcm"
        write_corrupt_file(root / rel, kind, template=template, seed=_derive_seed(seed, code, str(j)))
        rows.append((rel, SYNTHETIC_CLASSES[j % 2]))
    return rows


# --------------------------------------------------------------------------- from images


@dataclass(frozen=True)
class _SourceImage:
    path: Path
    label: int
    patient: str  # the real patient key: used for grouping only, never written
    view: str


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
    kept, as contract 3); ``max_images`` takes a class-proportional subset of whole patients.
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
    _prepare_out(out)
    bar = _progress(len(images), progress, "images -> DICOM")
    summaries: list[SiteSummary] = []
    for name, profile, patients in plan:
        rows: list[tuple[str, str]] = []
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
                if bar is not None:
                    bar.update(1)
        _write_labels(out / name, rows)
        patients_per_class = Counter(classes[patient_class[p]] for p in patients)
        summaries.append(_summary(name, rows, patients_per_class, 0, profile))
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
        raise SimulationError(f"{labels_csv}: need columns path (or file) and label; found {sorted(columns)}")
    patient_col = next((c for c in ("patient_id_coarse", "patient_id") if c in columns), None)
    if patient_col is None:
        log.warning("%s has no patient_id column: each file is its own patient (splits may leak)", labels_csv.name)
    names: dict[int, str] = {}
    images, missing = [], 0
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
        images.append(_SourceImage(path, label, patient, view if view in ("PA", "AP") else ""))
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


# --------------------------------------------------------------------------- shared helpers


def site_name(index: int) -> str:
    """``hospital-a``, ``hospital-b``, ... (``hospital-27`` and up past z)."""
    return f"hospital-{_site_code(index).lower()}"


def _site_code(index: int) -> str:
    return chr(ord("A") + index) if index < 26 else str(index + 1)


def _derive_seed(seed: int, *parts: str) -> int:
    return int(hashlib.sha256("\x00".join([str(seed), *parts]).encode()).hexdigest()[:15], 16)


def _prepare_out(out: Path) -> None:
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out}: output folder is not empty; pass a new folder or delete it first")
    out.mkdir(parents=True, exist_ok=True)


def _write_labels(root: Path, rows: list[tuple[str, str]]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / LABELS_FILE, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["file", "label"])
        writer.writerows(sorted(rows))


def _summary(name: str, rows: list[tuple[str, str]], patients: Counter, n_corrupt: int, profile: AcquisitionProfile) -> SiteSummary:
    return SiteSummary(
        name=name,
        n_patients=sum(patients.values()),
        n_images=len(rows),
        images_per_class=dict(sorted(Counter(label for _, label in rows).items())),
        patients_per_class=dict(sorted(patients.items())),
        n_corrupt=n_corrupt,
        profile=json.loads(json.dumps(profile.to_dict())),  # lists, as the saved manifest has
    )


def _progress(total: int, enabled: bool, desc: str) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img")


def read_labels(site_dir: Path) -> dict[str, str]:
    """``labels.csv`` of a written site as {relative file: label} (for tests and the CLI)."""
    with open(Path(site_dir) / LABELS_FILE, newline="", encoding="utf-8") as fh:
        return {row["file"]: row["label"] for row in csv.DictReader(fh)}


def iter_dicom_files(site_dir: Path) -> Iterator[Path]:
    """Every ``*.dcm`` under a site folder, sorted."""
    return iter(sorted(Path(site_dir).rglob("*.dcm")))
