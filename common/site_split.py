"""A site's pseudonyms and its patient-level train/validation split (moved out of common/dataset.py).

Patients are known only by a salted hash (the salt is the site's secret, created once in its state
dir), and every patient's images fall on one side of the split, decided by the site alone. The
:class:`Targets` a run trains on (built by ``common.dataset.encode_targets``) live here too, as the
split's strata come from them. common/dataset.py re-exports every public name.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


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
