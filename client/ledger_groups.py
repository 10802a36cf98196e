"""Which patients each ledger entry touched, grouped by shared history (the per-patient budget, format 2).

A contribution records its patient set by key: ``patients:<hash of the members>`` (the members kept
once in the document's ``patient_sets``), ``dataset:<fingerprint>`` when no patients were given,
or ALL_PATIENTS for format-1 entries, which count against everyone. Patients touched by the same
entries form one group with one epsilon; client/ledger.py composes each group's history and
refuses a round that would push any group it touches past max-epsilon.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

from client.ledger_records import ALL_PATIENTS, Contribution, _Step

#: A group of patients: (how many, the entries that touched them, oldest first).
Groups = dict[tuple[int, ...], tuple[int, list[Any]]]


def patient_set_key(members: list[str] | None, fingerprint: str) -> str:
    """The patient-set key of a new entry: a content hash of its members, or the dataset."""
    if members is None:
        return f"dataset:{fingerprint}"
    digest = hashlib.sha256(("\n".join(members)).encode()).hexdigest()[:24]
    return f"patients:{digest}"


def patient_groups(doc: dict[str, Any], extra: tuple[str, list[str] | None, _Step] | None = None,
                   only: set[str] | None = None) -> Groups:
    """Patients grouped by which entries touched them: signature -> (patients, history).

    A signature is the tuple of entry positions that apply to the group (ALL_PATIENTS entries
    apply to everyone). ``extra`` adds a not-yet-recorded entry (its set key, members, step);
    ``only`` restricts the explicit patients considered (those the new entry touches).
    """
    entries: list[Any] = [Contribution.from_json(raw) for raw in doc["contributions"]]
    sets = {k: v for k, v in doc.get("patient_sets", {}).items()}
    if extra is not None:
        entries.append(extra[2])
        if extra[1] is not None:
            sets.setdefault(extra[0], extra[1])
        refs = [*(c.patient_set for c in entries[:-1]), extra[0]]
    else:
        refs = [c.patient_set for c in entries]
    everyone = [i for i, r in enumerate(refs) if r == ALL_PATIENTS]
    touched: dict[str, list[int]] = {}
    datasets: dict[str, list[int]] = {}
    for i, ref in enumerate(refs):
        if ref.startswith("dataset:"):
            datasets.setdefault(ref, []).append(i)
        elif ref != ALL_PATIENTS:
            for patient in sets.get(ref, ()):
                if only is None or patient in only:
                    touched.setdefault(patient, []).append(i)
    groups: dict[tuple[int, ...], tuple[int, list[Any]]] = {}
    for patient_entries in touched.values():
        sig = tuple(sorted(set(everyone) | set(patient_entries)))
        count, _ = groups.get(sig, (0, []))
        groups[sig] = (count + 1, [entries[i] for i in sig])
    for positions in datasets.values():
        sig = tuple(sorted(set(everyone) | set(positions)))
        groups.setdefault(sig, (0, [entries[i] for i in sig]))
    if everyone and only is None:
        groups.setdefault(tuple(everyone), (0, [entries[i] for i in everyone]))
    return groups


def worst_group(doc: dict[str, Any], set_ref: str, members: list[str] | None, step: _Step,
                epsilon: Callable[[list[Any]], float]) -> tuple[float, float]:
    """(epsilon before, epsilon after) of the patient group the new entry pushes highest.

    ``epsilon`` composes a history (the ledger's accountant at the site's delta).
    """
    only = None if members is None else set(members)
    new_pos = len(doc["contributions"])
    worst_before, worst_after = 0.0, 0.0
    for sig, (_, history) in patient_groups(doc, extra=(set_ref, members, step), only=only).items():
        if new_pos not in sig:
            continue
        after = epsilon(history)
        if after > worst_after:
            worst_after, worst_before = after, epsilon([h for h in history if h is not step])
    return worst_before, worst_after
