"""Input drift: the recent images against the reference the model was trained on.

``fl-predict`` and ``serve`` append each scored image's statistics (:mod:`common.reference`:
grey levels, brightness, contrast, sharpness, the model's scores; never a UID or a name) to a
rolling window kept in ``<state>/drift-window.json``. ``fl-predict drift`` compares the window
with the reference, statistic by statistic:

* **PSI** (population stability index) ``sum (w - r) ln(w / r)`` over the bins of the window's
  and the reference's proportions (a bin empty on one side counts as half an image, so one
  empty bin does not make PSI infinite). The usual reading: < 0.1 stable, 0.1-0.25 a moderate
  shift (``warn``), >= 0.25 a major shift (``alarm``).
* **KS** (two-sample Kolmogorov-Smirnov on the binned distributions) with its p-value, which
  knows the sample sizes. PSI of a small window is inflated by sampling noise alone (about
  (bins - 1) * (1/n_window + 1/n_reference)), so a statistic is only flagged when PSI crosses
  its threshold **and** KS rejects "same distribution" at ``P_VALUE`` (0.001). For the pooled
  grey-level histogram the KS sample size is the number of images, not of pixels.

A window under ``MIN_IMAGES`` images reports ``collecting`` and flags nothing. docs/clinic.md
says what an alarm means and what to do.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from common.cache import atomic_write_bytes
from common.reference import (
    IMAGE_STATS,
    METADATA_KEY,
    PER_IMAGE,
    SCORE_PREFIX,
    Histogram,
    Reference,
    add_counts,
    bin_counts,
    edges,
    image_statistics,
    parse_reference,
    reference_json,
)

logger = logging.getLogger(__name__)

WINDOW_FILE = "drift-window.json"
REFERENCE_FILE = "drift-reference.json"  # a reference built from a trusted folder (fl-predict drift --reference)
REPORT_FILE = "drift-report.json"
PLOT_FILE = "drift.png"
WINDOW_SCHEMA = "fedxray.drift-window/1"
WINDOW_SIZE = 500  # images kept in the rolling window (a few days of chest X-rays in a mid-size department)
MIN_IMAGES = 100  # below this the window is "collecting": too few images to tell drift from chance
PSI_WARN = 0.1
PSI_ALARM = 0.25
P_VALUE = 0.001
_EMPTY_BIN = 0.5  # pseudo-count of an empty bin, in images


# --------------------------------------------------------------------------- comparison


def psi(window: NDArray[np.float64], reference: NDArray[np.float64], n_window: float, n_reference: float) -> float:
    """PSI of two proportion vectors; an empty bin counts as half an image of its sample."""
    w = np.maximum(np.asarray(window, dtype=np.float64), _EMPTY_BIN / max(n_window, 1.0))
    r = np.maximum(np.asarray(reference, dtype=np.float64), _EMPTY_BIN / max(n_reference, 1.0))
    w, r = w / w.sum(), r / r.sum()
    return float(np.sum((w - r) * np.log(w / r)))


def ks(window: NDArray[np.float64], reference: NDArray[np.float64], n_window: float, n_reference: float) -> tuple[float, float]:
    """(D, p-value) of the two-sample KS test on binned proportions (asymptotic Kolmogorov distribution)."""
    d = float(np.max(np.abs(np.cumsum(window) - np.cumsum(reference)))) if len(window) else 0.0
    if n_window <= 0 or n_reference <= 0:
        return d, 1.0
    en = math.sqrt(n_window * n_reference / (n_window + n_reference))
    lam = (en + 0.12 + 0.11 / en) * d  # Stephens' small-sample correction (Numerical Recipes)
    if lam < 1e-3:
        return d, 1.0
    p = 2.0 * sum((-1) ** (k - 1) * math.exp(-2.0 * k * k * lam * lam) for k in range(1, 101))
    return d, float(min(1.0, max(0.0, p)))


@dataclass(frozen=True)
class StatDrift:
    """One statistic's comparison."""

    name: str
    psi: float
    ks_d: float
    p_value: float
    n_window: int
    n_reference: int
    status: str  # ok, warn, alarm, collecting


def status_of(psi_value: float, p_value: float, n_window: int) -> str:
    if n_window < MIN_IMAGES:
        return "collecting"
    if p_value >= P_VALUE:
        return "ok"
    return "alarm" if psi_value >= PSI_ALARM else "warn" if psi_value >= PSI_WARN else "ok"


def compare(window: Reference, reference: Reference) -> list[StatDrift]:
    """Drift of every statistic the two have in common (image statistics first, then scores)."""
    names = [n for n in (*IMAGE_STATS, *sorted(k for k in reference.statistics if k.startswith(SCORE_PREFIX)))
             if n in window.statistics and n in reference.statistics]
    out = []
    for name in names:
        w, r = window.statistics[name], reference.statistics[name]
        n_w, n_r = window.n_images, reference.n_images  # images, also for the pooled grey levels
        p_w, p_r = w.proportions(), r.proportions()
        value = psi(p_w, p_r, n_w, n_r)
        d, p = ks(p_w, p_r, n_w, n_r)
        out.append(StatDrift(name, round(value, 4), round(d, 4), float(f"{p:.3g}"), n_w, n_r, status_of(value, p, n_w)))
    return out


def overall(drifts: list[StatDrift]) -> str:
    """The worst status over all statistics."""
    order = ("alarm", "warn", "collecting", "ok")
    found = {d.status for d in drifts}
    return next((s for s in order if s in found), "ok")


# --------------------------------------------------------------------------- rolling window


@dataclass(frozen=True)
class Observation:
    """One image's drift statistics: scalars plus its grey-level bin counts (no identifiers)."""

    values: dict[str, float]  # brightness, contrast, sharpness, score:<label>
    intensity: list[int]

    @classmethod
    def of(cls, model_input: NDArray[np.float32], probabilities: Mapping[str, float]) -> Observation:
        values, intensity = image_statistics(model_input)
        values.update({SCORE_PREFIX + label: float(p) for label, p in probabilities.items()})
        return cls({k: round(v, 6) for k, v in values.items()}, intensity)


class Window:
    """The last ``size`` observations in ``<state>/drift-window.json``, shared by processes.

    Every update is read-modify-write under an exclusive ``flock`` on a lock file beside it, and
    the file is replaced atomically, so ``fl-predict`` and ``serve`` can feed the same window.
    A window kept for another model (other file hash) is started afresh: its scores would not
    be comparable.
    """

    def __init__(self, state_dir: Path, model_sha256: str, size: int = WINDOW_SIZE) -> None:
        self.path = Path(state_dir) / WINDOW_FILE
        self.model_sha256 = model_sha256
        self.size = size

    def add(self, observations: list[Observation]) -> int:
        """Append observations (oldest dropped beyond ``size``); returns the window's length."""
        if not observations:
            return len(self.load())
        with self._locked():
            entries = self._read()
            now = datetime.now(UTC).isoformat(timespec="seconds")
            entries.extend({"time": now, **asdict(o)} for o in observations)
            entries = entries[-self.size :]
            doc = {"schema": WINDOW_SCHEMA, "model_sha256": self.model_sha256, "size": self.size, "entries": entries}
            atomic_write_bytes(self.path, json.dumps(doc, separators=(",", ":")).encode())
        return len(entries)

    def load(self) -> list[dict]:
        """The window's entries (oldest first); empty when there is none for this model."""
        if not self.path.exists():
            return []
        with self._locked():
            return self._read()

    def histograms(self) -> Reference:
        """The window as histograms in the reference's bins."""
        return histograms_of([Observation(e["values"], e["intensity"]) for e in self.load()], source=str(self.path))

    def _read(self) -> list[dict]:
        try:
            doc = json.loads(self.path.read_text())
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as err:
            logger.warning("drift window %s unreadable (%s): starting a new one", self.path, err)
            return []
        if doc.get("schema") != WINDOW_SCHEMA or doc.get("model_sha256") != self.model_sha256:
            logger.info("drift window %s was kept for another model: starting a new one", self.path)
            return []
        return list(doc.get("entries", []))

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


def histograms_of(observations: list[Observation], source: str = "") -> Reference:
    """Observations -> histograms in the fixed bins (what a reference built from a folder is, too)."""
    stats: dict[str, Histogram] = {}
    if observations:
        intensity = add_counts({"intensity": o.intensity} for o in observations)["intensity"]
        stats["intensity"] = Histogram(edges("intensity"), [float(c) for c in intensity])
        # every observation's score names: an image the intended-use gate refused has no scores
        names = [*PER_IMAGE, *sorted({k for o in observations for k in o.values if k.startswith(SCORE_PREFIX)})]
        for name in names:
            counts = bin_counts(name, [o.values[name] for o in observations if name in o.values])
            stats[name] = Histogram(edges(name), [float(c) for c in counts])
    return Reference(len(observations), stats, source=source)


def reference_from_observations(observations: list[Observation], input_size: tuple[int, int], *, model_sha256: str) -> str:
    """A ``fedxray.reference`` JSON built from observations of trusted images (the --reference fallback)."""
    ref = histograms_of(observations)
    counts = {name: [int(c) for c in hist.counts] for name, hist in ref.statistics.items()}
    return reference_json(counts, ref.n_images, input_size, model_sha256=model_sha256)


# --------------------------------------------------------------------------- finding the reference


def find_reference(raw_meta: Mapping[str, str], state_dir: Path | None, *, model_sha256: str) -> Reference | None:
    """The reference to compare with, or None when there is none.

    A reference the hospital built from its own trusted images (``<state>/drift-reference.json``,
    for this model) comes first: the hospital chose it. Otherwise the model's own
    (``fedxray.reference`` metadata, pooled from the training sites).
    """
    if state_dir is not None and (Path(state_dir) / REFERENCE_FILE).is_file():
        path = Path(state_dir) / REFERENCE_FILE
        local = parse_reference(path.read_text(), source=str(path))
        if local.model_sha256 == model_sha256:
            return local
        logger.warning("%s was built for another model: ignored (rebuild it with fl-predict drift --reference DIR)", path)
    if METADATA_KEY in raw_meta:
        return parse_reference(raw_meta[METADATA_KEY], source="model metadata")
    return None


# --------------------------------------------------------------------------- report and plot


def report(drifts: list[StatDrift], reference: Reference, window: Reference) -> dict:
    """JSON-ready report: overall status, thresholds, one entry per statistic."""
    return {
        "status": overall(drifts),
        "window_images": window.n_images,
        "reference_images": reference.n_images,
        "reference_source": reference.source,
        "thresholds": {"psi_warn": PSI_WARN, "psi_alarm": PSI_ALARM, "p_value": P_VALUE, "min_images": MIN_IMAGES},
        "statistics": [asdict(d) for d in drifts],
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def log_line(drifts: list[StatDrift]) -> str:
    """One log line: overall status and PSI per statistic."""
    parts = ", ".join(f"{d.name} {d.psi:.3f}{'' if d.status in ('ok', 'collecting') else ' ' + d.status.upper()}" for d in drifts)
    n = drifts[0].n_window if drifts else 0
    return f"drift {overall(drifts)} over {n} image(s): PSI {parts}"


def plot(drifts: list[StatDrift], reference: Reference, window: Reference, path: Path) -> None:
    """One panel per statistic: reference vs window proportions, with PSI and status in the title."""
    import matplotlib

    matplotlib.use("Agg")  # deferred: only the report needs matplotlib's pyplot (no display here)
    import matplotlib.pyplot as plt

    n = max(1, len(drifts))
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    colours = {"ok": "tab:green", "collecting": "tab:gray", "warn": "tab:orange", "alarm": "tab:red"}
    for ax, d in zip(axes.ravel(), drifts):
        e = np.asarray(reference.statistics[d.name].edges)
        centres, width = (e[:-1] + e[1:]) / 2, np.diff(e)
        ax.bar(centres, reference.statistics[d.name].proportions(), width=width, alpha=0.45, label=f"reference ({d.n_reference})")
        ax.step(e, np.append(window.statistics[d.name].proportions(), 0), where="post", color="black", label=f"window ({d.n_window})")
        ax.set_title(f"{d.name}: PSI {d.psi:.3f}, KS p {d.p_value:.2g} - {d.status}", fontsize=9, color=colours.get(d.status, "black"))
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7)
    for ax in axes.ravel()[len(drifts) :]:
        ax.axis("off")
    fig.suptitle(f"fedxray input drift: {overall(drifts)} (PSI warn {PSI_WARN}, alarm {PSI_ALARM}; KS p < {P_VALUE})", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
