"""How patients are shared out between simulated hospitals (the partition maths, no I/O).

Federated results depend on how different the hospitals are, so the split is a parameter of the
study, not an accident. Four schemes, all at patient level (a patient's images never straddle two
hospitals, or a hospital and the hold-out):

- ``iid``: equal sizes, every hospital has the global class mix (stratified).
- ``label-skew``: equal sizes, each class is shared out by a Dirichlet(alpha) draw over hospitals
  (Yurochkin et al. 2019; NIID-Bench), so prevalence differs between hospitals. Small alpha means
  strong skew.
- ``quantity-skew``: hospital sizes from a Dirichlet(alpha) draw, global class mix everywhere.
- ``label-and-quantity``: both.

The draws are turned into an integer table ``counts[site, class]`` whose row sums are the hospital
sizes and whose column sums are the class totals (iterative proportional fitting, then rounding
that keeps both margins), and every hospital keeps at least ``min_per_class`` patients of each
class where the class is large enough: a hospital without positives cannot compute an AUC.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np

SCHEMES = ("iid", "label-skew", "quantity-skew", "label-and-quantity")


class PartitionError(ValueError):
    """A partition request that cannot be met (unknown scheme, too few patients, bad fraction)."""


def check_scheme(scheme: str) -> None:
    """Raise ``PartitionError`` unless ``scheme`` is one of ``SCHEMES``."""
    if scheme not in SCHEMES:
        raise PartitionError(f"unknown partition scheme {scheme!r}; expected one of {', '.join(SCHEMES)}")


def label_skewed(scheme: str) -> bool:
    """True when the scheme varies the class mix between hospitals."""
    check_scheme(scheme)
    return scheme in ("label-skew", "label-and-quantity")


def quantity_skewed(scheme: str) -> bool:
    """True when the scheme varies hospital sizes."""
    check_scheme(scheme)
    return scheme in ("quantity-skew", "label-and-quantity")


def site_sizes(total: int, n_sites: int, *, skewed: bool, alpha: float, min_size: int, rng: np.random.Generator) -> np.ndarray:
    """Number of patients per hospital, summing to ``total``.

    Equal shares (the first ``total % n_sites`` hospitals get one more) unless ``skewed``, then
    shares ~ Dirichlet(alpha) with every hospital raised to ``min_size`` (taken from the largest)
    so that a tiny hospital still has something to train and validate on.
    """
    if n_sites < 1:
        raise PartitionError(f"n_sites must be >= 1, got {n_sites}")
    if total < n_sites:
        raise PartitionError(f"{total} patients cannot fill {n_sites} hospitals; use fewer hospitals or more patients")
    if not skewed:
        sizes = np.full(n_sites, total // n_sites, dtype=np.int64)
        sizes[: total % n_sites] += 1
        return sizes
    if alpha <= 0:
        raise PartitionError(f"alpha must be > 0, got {alpha}")
    shares = rng.dirichlet(np.full(n_sites, alpha))
    sizes = _round_to_total(shares * total, total)
    floor = min(min_size, total // n_sites)
    while (sizes < floor).any():
        small, large = int(np.argmin(sizes)), int(np.argmax(sizes))
        sizes[small] += 1
        sizes[large] -= 1
    return sizes


def class_table(
    class_counts: Sequence[int],
    sizes: Sequence[int],
    *,
    skewed: bool,
    alpha: float,
    min_per_class: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """Integer table ``[site, class]`` with row sums ``sizes`` and column sums ``class_counts``.

    Without skew the target is the stratified share ``size * class_share``; with skew each class
    is spread over hospitals by Dirichlet(alpha). The continuous target is fitted to both margins
    (IPF), rounded without breaking them, then patched so each hospital has ``min_per_class`` of
    every class that has at least ``min_per_class * n_sites`` patients (fewer otherwise).
    """
    counts = np.asarray(class_counts, dtype=np.int64)
    rows = np.asarray(sizes, dtype=np.int64)
    if counts.sum() != rows.sum():
        raise PartitionError(f"hospital sizes sum to {rows.sum()} but classes to {counts.sum()}; they must match")
    n_sites, n_classes = len(rows), len(counts)
    if skewed:
        if alpha <= 0:
            raise PartitionError(f"alpha must be > 0, got {alpha}")
        spread = rng.dirichlet(np.full(n_sites, alpha), size=n_classes).T  # [site, class]
        target = spread * counts[None, :]
    else:
        target = rows[:, None] * (counts / max(counts.sum(), 1))[None, :]
    table = _round_with_margins(_fit_margins(target + 1e-3, rows, counts), rows, counts)
    for c in range(n_classes):
        floor = min(min_per_class, int(counts[c]) // n_sites)
        _raise_class_floor(table, c, floor)
    return table


def assign_patients(
    patient_classes: Mapping[Hashable, int],
    table: np.ndarray,
    rng: np.random.Generator,
) -> list[list[Hashable]]:
    """Deal patients out according to ``table[site, class]``; returns each hospital's patients.

    ``patient_classes`` maps patient -> class index; patients of one class are shuffled by
    ``rng`` (after sorting, so the result depends on the ids, not on dict order).
    """
    sites: list[list[Hashable]] = [[] for _ in range(table.shape[0])]
    for c in range(table.shape[1]):
        members = sorted((p for p, k in patient_classes.items() if k == c), key=str)
        if len(members) != int(table[:, c].sum()):
            raise PartitionError(f"class {c} has {len(members)} patients but the table places {int(table[:, c].sum())}")
        order = rng.permutation(len(members))
        start = 0
        for s in range(table.shape[0]):
            stop = start + int(table[s, c])
            sites[s].extend(members[i] for i in order[start:stop])
            start = stop
    return sites


def partition_patients(
    patient_classes: Mapping[Hashable, int],
    n_sites: int,
    *,
    scheme: str = "iid",
    alpha: float = 0.5,
    min_per_class: int = 3,
    seed: int = 0,
) -> list[list[Hashable]]:
    """Split patients (patient -> class index) into ``n_sites`` disjoint hospitals by ``scheme``.

    Deterministic for a given seed and set of patients. Every patient lands in exactly one
    hospital; see the module docstring for the schemes.
    """
    check_scheme(scheme)
    if not patient_classes:
        raise PartitionError("no patients to partition")
    n_classes = max(patient_classes.values()) + 1
    counts = np.bincount(np.fromiter(patient_classes.values(), dtype=np.int64), minlength=n_classes)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5EED]))
    min_size = min_per_class * int((counts > 0).sum())
    sizes = site_sizes(int(counts.sum()), n_sites, skewed=quantity_skewed(scheme), alpha=alpha, min_size=min_size, rng=rng)
    table = class_table(counts, sizes, skewed=label_skewed(scheme), alpha=alpha, min_per_class=min_per_class, rng=rng)
    return assign_patients(patient_classes, table, rng)


def holdout_split(patient_classes: Mapping[Hashable, int], fraction: float, *, seed: int = 0) -> tuple[list[Hashable], list[Hashable]]:
    """Stratified, patient-level hold-out: returns (held-out patients, the rest).

    ``round(fraction * n_c)`` patients of each class c are held out, so the hold-out has the
    global class mix; 0 gives an empty hold-out.
    """
    if not 0.0 <= fraction < 1.0:
        raise PartitionError(f"holdout_fraction must be in [0, 1), got {fraction}")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x401D]))
    held: list[Hashable] = []
    rest: list[Hashable] = []
    for c in sorted(set(patient_classes.values())):
        members = sorted((p for p, k in patient_classes.items() if k == c), key=str)
        order = rng.permutation(len(members))
        n_held = int(round(fraction * len(members)))
        held.extend(members[i] for i in order[:n_held])
        rest.extend(members[i] for i in order[n_held:])
    return held, rest


# --------------------------------------------------------------------------- helpers


def _round_to_total(values: np.ndarray, total: int) -> np.ndarray:
    """Largest-remainder rounding of non-negative ``values`` to integers summing to ``total``."""
    floors = np.floor(values).astype(np.int64)
    missing = total - int(floors.sum())
    order = np.argsort(-(values - floors), kind="stable")
    floors[order[:missing]] += 1
    return floors


def _fit_margins(target: np.ndarray, rows: np.ndarray, cols: np.ndarray, iterations: int = 200) -> np.ndarray:
    """Iterative proportional fitting: scale ``target`` until its margins are ``rows`` and ``cols``."""
    table = target.astype(np.float64).copy()
    for _ in range(iterations):
        table *= (rows / np.maximum(table.sum(axis=1), 1e-12))[:, None]
        table *= (cols / np.maximum(table.sum(axis=0), 1e-12))[None, :]
        if np.allclose(table.sum(axis=1), rows, atol=1e-6):
            break
    return table


def _round_with_margins(table: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Round a non-negative table to integers whose row and column sums are exactly ``rows``/``cols``."""
    out = np.floor(table).astype(np.int64)
    row_gap = rows - out.sum(axis=1)
    col_gap = cols - out.sum(axis=0)
    frac = table - out
    for flat in np.argsort(-frac, axis=None, kind="stable"):
        r, c = np.unravel_index(flat, table.shape)
        if row_gap[r] > 0 and col_gap[c] > 0:
            out[r, c] += 1
            row_gap[r] -= 1
            col_gap[c] -= 1
    while row_gap.sum() > 0:  # leftovers the fractional pass could not place
        r, c = int(np.argmax(row_gap)), int(np.argmax(col_gap))
        out[r, c] += 1
        row_gap[r] -= 1
        col_gap[c] -= 1
    return out


def _raise_class_floor(table: np.ndarray, c: int, floor: int) -> None:
    """Give every hospital >= ``floor`` patients of class ``c`` by 2x2 swaps that keep both margins.

    A hospital short of class c takes one from the hospital richest in c and gives back a patient
    of another class d it has to spare, so sizes and class totals do not change.
    """
    n_sites, n_classes = table.shape
    for _ in range(int(table.sum()) + 1):
        short = [s for s in range(n_sites) if table[s, c] < floor]
        if not short:
            return
        s = short[0]
        donors = [k for k in range(n_sites) if table[k, c] > floor]
        if not donors:
            return
        k = max(donors, key=lambda i: table[i, c])
        # the other class that s can best spare (and that keeps its own floor)
        options = [d for d in range(n_classes) if d != c and table[s, d] > 0]
        if not options:
            return
        d = max(options, key=lambda j: table[s, j])
        table[s, c] += 1
        table[k, c] -= 1
        table[s, d] -= 1
        table[k, d] += 1
