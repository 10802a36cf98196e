"""Synthetic hospitals: phantom chest radiographs (normal / opacity), each site through its own profile.

Sites differ in how their pixels are stored (simulations/acquisition.py) as well as in size and
class mix (simulations/partition.py). Same arguments and seed give byte-identical files.
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace
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
from simulations.hospital_layout import (
    MANIFEST_FILE,
    SYNTHETIC_CLASSES,
    HospitalsManifest,
    SimulationError,
    SiteSummary,
    derive_seed,
    prepare_out,
    progress_bar,
    site_code,
    site_name,
    site_summary,
    write_labels,
)
from simulations.phantom import follow_up, render_phantom, sample_anatomy, sample_opacity

log = logging.getLogger(__name__)

AP_SHARE = 0.2  # share of synthetic studies taken AP (bedside) rather than PA


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
    max_matrix: int | None = None,
    workers: int = 1,
) -> HospitalsManifest:
    """Write ``n_sites`` hospitals of synthetic chest radiographs (normal / opacity) under ``out``.

    ``patients_per_site`` and ``prevalence`` given per site are used as they are; given as one
    number they are the mean, and ``partition`` (with ``alpha``) decides how sizes and prevalence
    vary between sites. Patients are positive or negative as a whole; each has 1..n follow-up
    studies. ``corrupt_per_site`` unreadable files (truncated, non-image, garbage) are added to
    each site and listed in labels.csv like the others (an export lists what it meant to write),
    so a reader meets them while decoding; the manifest counts them apart (``n_corrupt``), and its
    ``n_images`` / ``images_per_class`` count readable images only.

    ``max_matrix`` caps the stored matrix (the longer side, in pixels; aspect kept): a run that
    resizes to 32 px gains nothing from drawing, encoding and decoding 352 px phantoms (about 26 ms
    of CPU per file, against 7 ms at 128 px). ``workers`` processes write sites in parallel (sites are independent and
    seeded apart, so the files are the same for any number of workers).
    """
    out = Path(out)
    table = _synthetic_plan(n_sites, patients_per_site, prevalence, partition, alpha, seed, images_per_patient, corrupt_per_site)
    if max_matrix is not None and max_matrix < 16:
        raise SimulationError(f"cannot make synthetic hospitals: max_matrix {max_matrix} (expected >= 16 pixels)")
    prepare_out(out)
    profiles = [_capped(p, max_matrix) for p in site_profiles(n_sites, seed)]
    bar = progress_bar(int(table.sum()) * (images_per_patient[0] + images_per_patient[1]) // 2, progress, "synthetic images")
    jobs = [(out, index, profile, table[index], images_per_patient, corrupt_per_site, seed)
            for index, profile in enumerate(profiles)]
    workers = max(1, min(workers, n_sites))
    if workers == 1:
        summaries = [_write_synthetic_site(*job, bar) for job in jobs]
    else:
        # fork where there is one: children start at once and leave no resource-tracker process behind
        # (spawn's does outlive the pool). They only draw and write files: numpy and pydicom, no torch.
        methods = multiprocessing.get_all_start_methods()
        context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
        # A Pool, not a ProcessPoolExecutor: on an error or a stop signal it terminates the workers at once, where
        # the executor waited for every queued site. Progress: the files written so far, counted
        # every second while the sites are written (a site is one job, minutes long at 500 patients).
        pool = context.Pool(workers, initializer=_worker_signals)
        try:
            results = pool.imap(_write_job, jobs, chunksize=max(1, n_sites // (8 * workers)))
            summaries = []
            while len(summaries) < len(jobs):
                try:
                    summaries.append(results.next(timeout=1.0))
                except multiprocessing.TimeoutError:
                    pass
                bar.update(sum(1 for _ in out.rglob("*.dcm")) - bar.n)
            pool.close()  # done: the workers end by themselves
        except BaseException:
            pool.terminate()  # an error or a stop signal: the workers end now, the queued sites are dropped
            raise
        finally:
            pool.join()
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


def _capped(profile: AcquisitionProfile, max_matrix: int | None) -> AcquisitionProfile:
    """The profile with its matrix shrunk (aspect kept) so its longer side is at most ``max_matrix``."""
    rows, cols = profile.matrix
    if max_matrix is None or max(rows, cols) <= max_matrix:
        return profile
    scale = max_matrix / max(rows, cols)
    return replace(profile, matrix=(max(16, round(rows * scale)), max(16, round(cols * scale))))


def _worker_signals() -> None:
    """In a writer process: the terminal's Ctrl-C reaches the whole process group, but the parent decides (it
    ends the pool), so SIGINT is ignored here; SIGTERM, which ends the pool's workers, ends them at once. A
    forked worker inherits the parent's Python handlers: fl-sim's would raise its StopSignal in the worker
    (a traceback, and a worker dead while it held the pool's result lock)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _write_job(job: tuple) -> SiteSummary:
    return _write_synthetic_site(*job)


def _write_synthetic_site(
    out: Path,
    index: int,
    profile: AcquisitionProfile,
    counts: np.ndarray,
    images_per_patient: tuple[int, int],
    corrupt_per_site: int,
    seed: int,
    bar: Any = None,
) -> SiteSummary:
    name, code = site_name(index), site_code(index)
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
                seed=derive_seed(seed, name, rel),
                study_date=(first_day + timedelta(days=30 * k)).strftime("%Y%m%d"),
                institution=f"Synthetic Hospital {code}",
            )
            rows.append((rel, SYNTHETIC_CLASSES[label]))
            if bar is not None:
                bar.update(1)
    corrupt = _write_corrupt_files(root, code, index, corrupt_per_site, template=root / rows[0][0], seed=seed)
    write_labels(root, rows + corrupt)
    patients = Counter(SYNTHETIC_CLASSES[label] for label in labels.tolist())
    return site_summary(name, rows, patients, len(corrupt), profile)


def _write_corrupt_files(root: Path, code: str, index: int, n: int, *, template: Path, seed: int) -> list[tuple[str, str]]:
    """Corrupt files named and labelled like real ones (a reader cannot tell them by path or
    labels.csv, only by decoding); kinds rotate by site. Returns their labels.csv rows."""
    rows = []
    for j in range(n):
        kind = CORRUPT_KINDS[(index + j) % len(CORRUPT_KINDS)]
        rel = f"SIM-{code}-{9001 + j}/study-1/1.dcm"
        write_corrupt_file(root / rel, kind, template=template, seed=derive_seed(seed, code, str(j)))
        rows.append((rel, SYNTHETIC_CLASSES[j % 2]))
    return rows
