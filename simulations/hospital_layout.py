"""The layout every simulated hospital folder shares, and its manifest.

Both builders (simulations/synthetic_hospitals.py, simulations/image_hospitals.py) write::

    <out>/manifest.json                      sites, class counts, profiles, seed (no identifiers)
    <out>/<site>/labels.csv                  file (relative to the site folder), label (class name)
    <out>/<site>/<patient>/<study>/<n>.dcm   the radiographs; the label is never in the path
    <out>/holdout/...                        optional common test set, same layout
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from common.progress import progress
from common.site_labels import EXPECTED_COLUMNS, closest_labels_file, no_labels_message
from simulations.acquisition import AcquisitionProfile

SYNTHETIC_CLASSES = ("normal", "opacity")
LABELS_FILE = "labels.csv"
MANIFEST_FILE = "manifest.json"
HOLDOUT_SITE = "holdout"


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


def site_name(index: int) -> str:
    """``hospital-a``, ``hospital-b``, ... (``hospital-27`` and up past z)."""
    return f"hospital-{site_code(index).lower()}"


def site_code(index: int) -> str:
    """``A``..``Z``, then the site's number: the letter in patient ids and institution names."""
    return chr(ord("A") + index) if index < 26 else str(index + 1)


def derive_seed(seed: int, *parts: str) -> int:
    """A per-file seed from the run's seed and names (stable across runs and machines)."""
    return int(hashlib.sha256("\x00".join([str(seed), *parts]).encode()).hexdigest()[:15], 16)


def prepare_out(out: Path) -> None:
    """Create ``out``; refuse one that already holds files."""
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out}: output folder is not empty; pass a new folder or delete it first")
    out.mkdir(parents=True, exist_ok=True)


def write_labels(root: Path, rows: list[tuple[str, str]]) -> None:
    """``labels.csv`` of a site: file (relative to the site folder), label; sorted by file."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / LABELS_FILE, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["file", "label"])
        writer.writerows(sorted(rows))


def site_summary(name: str, rows: list[tuple[str, str]], patients: Counter, n_corrupt: int, profile: AcquisitionProfile) -> SiteSummary:
    return SiteSummary(
        name=name,
        n_patients=sum(patients.values()),
        n_images=len(rows),
        images_per_class=dict(sorted(Counter(label for _, label in rows).items())),
        patients_per_class=dict(sorted(patients.items())),
        n_corrupt=n_corrupt,
        profile=json.loads(json.dumps(profile.to_dict())),  # lists, as the saved manifest has
    )


def progress_bar(total: int, enabled: bool, desc: str) -> Any:
    """A tqdm bar when ``enabled`` on a terminal, else a line every few seconds (common/progress.py)."""
    return progress(total, desc, "img", bar=enabled)


def read_labels(site_dir: Path) -> dict[str, str]:
    """``labels.csv`` of a written site as {relative file: label} (for tests and the CLI)."""
    with open(Path(site_dir) / LABELS_FILE, newline="", encoding="utf-8") as fh:
        return {row["file"]: row["label"] for row in csv.DictReader(fh)}


def iter_dicom_files(site_dir: Path) -> Iterator[Path]:
    """Every ``*.dcm`` under a site folder, sorted."""
    return iter(sorted(Path(site_dir).rglob("*.dcm")))


def hospital_folders_problem(data: Path) -> str | None:
    """Why ``data`` (no labels.csv of its own) cannot be used as hospital folders, in one line; None when it can.

    Each hospital folder needs labels.csv or class subfolders; a folder of unlabelled subfolders (patient
    folders, say) ran a federation of sites that all failed, and then ended in a traceback.
    """
    subfolders = sorted(p for p in data.iterdir() if p.is_dir() and p.name != "holdout")
    if not subfolders:
        n_images = sum(1 for p in data.iterdir() if p.is_file() and p.name.lower() != LABELS_FILE)
        return no_labels_message(data, n_images, [])
    unlabelled = [d for d in subfolders if not (d / LABELS_FILE).is_file() and not any(p.is_dir() for p in d.iterdir())]
    if not unlabelled:
        return None
    near = closest_labels_file(data) or next((n for d in unlabelled if (n := closest_labels_file(d))), None)
    hint = f" (found {near}: name it {LABELS_FILE})" if near else ""
    if len(unlabelled) == len(subfolders):  # counted, not named: subfolders may be named by patient
        return (f"--data {data} holds no labels{hint}: no {LABELS_FILE} in it (for an image set to partition) and none "
                f"of its {len(subfolders)} subfolders has {LABELS_FILE} or class subfolders (for hospital folders); "
                f"add {LABELS_FILE} with columns {EXPECTED_COLUMNS}")
    return (f"{len(unlabelled)} of the {len(subfolders)} hospital folders in {data} have no {LABELS_FILE} and no class "
            f"subfolders{hint}; give each {LABELS_FILE} with columns {EXPECTED_COLUMNS}")
