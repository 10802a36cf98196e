"""Drift reference statistics: what is measured on each image, the fixed bins, and the JSON schema.

This module is the contract between the federation (which stores a reference in the exported
model's ``fedxray.reference`` metadata) and the clinic (which compares its recent inputs with
it, :mod:`clinic.drift`). It depends on numpy only: the sites compute their (noised) image
statistics with it, the coordinator sums them and the clinic reads them.

**Per image** (on the model input, i.e. after ``common.preprocess.to_model_input``: what the
model sees, float32 [H, W] in [0, 1]):

==================  =====================================================  =======  ============
statistic           value                                                  bins     range
==================  =====================================================  =======  ============
``intensity``       every pixel (a pooled grey-level histogram)            20       [0, 1]
``brightness``      mean pixel value                                       10       [0, 1]
``contrast``        standard deviation of the pixels                       10       [0, 0.4]
``sharpness``       mean absolute difference of neighbouring pixels        10       [0, 0.1]
``score:<label>``   the model's probability for ``<label>``                10       [0, 1]
==================  =====================================================  =======  ============

Bins are fixed and equal-width (edges :func:`edges`), so histograms from many sites add up bin
by bin; values outside the range go to the first or last bin. Counts are numbers of images,
except ``intensity``, whose counts are numbers of pixels (every image contributes H*W).

**Schema** (``fedxray.reference``, a JSON string; :func:`reference_json` writes it)::

    {"schema": "fedxray.reference/1",
     "n_images": 5216,
     "input_size": [64, 64],                     (optional)
     "model_sha256": "...",                      (optional: set when a hospital builds one)
     "statistics": {"intensity":  {"edges": [0.0, 0.05, ..., 1.0], "counts": [20 ints]},
                    "brightness": {"edges": [11 floats], "counts": [10 ints]},
                    "contrast":   {...}, "sharpness": {...},
                    "score:PNEUMONIA": {"edges": [...], "counts": [...]}}}

In a federation each site sends :func:`noised_image_counts` of its validation images: Gaussian
noise on every count, each image's ``intensity`` histogram normalised to sum 1 first, so one image
moves the whole vector by at most 2 in L2 norm (1 per statistic) and the release is a Gaussian
mechanism the site charges to its validation patients (client/round.py). The score histogram
comes from the evaluation histograms the coordinator already has (:func:`rebin_scores`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

SCHEMA = "fedxray.reference/1"
METADATA_KEY = "fedxray.reference"
SCORE_PREFIX = "score:"


@dataclass(frozen=True)
class StatSpec:
    """Fixed binning of one statistic: ``bins`` equal bins on [lo, hi], out-of-range values clipped in."""

    lo: float
    hi: float
    bins: int
    doc: str

    def edges(self) -> list[float]:
        return [round(float(e), 10) for e in np.linspace(self.lo, self.hi, self.bins + 1)]


IMAGE_STATS: dict[str, StatSpec] = {
    "intensity": StatSpec(0.0, 1.0, 20, "grey levels of all pixels of the model input"),
    "brightness": StatSpec(0.0, 1.0, 10, "mean pixel value per image"),
    "contrast": StatSpec(0.0, 0.4, 10, "standard deviation of the pixels per image"),
    "sharpness": StatSpec(0.0, 0.1, 10, "mean absolute difference of neighbouring pixels per image"),
}
SCORE_STAT = StatSpec(0.0, 1.0, 10, "the model's probability per image")
PER_IMAGE = ("brightness", "contrast", "sharpness")  # scalar per image (intensity is a histogram per image)


class ReferenceError(ValueError):
    """A reference that does not follow the schema (the message names the key and the fix)."""


@dataclass(frozen=True)
class Histogram:
    edges: list[float]
    counts: list[float]

    @property
    def total(self) -> float:
        return float(sum(self.counts))

    def proportions(self) -> NDArray[np.float64]:
        counts = np.asarray(self.counts, dtype=np.float64)
        total = counts.sum()
        return counts / total if total > 0 else counts


@dataclass(frozen=True)
class Reference:
    """A parsed reference: histograms by statistic name, and how many images made them."""

    n_images: int
    statistics: dict[str, Histogram]
    input_size: tuple[int, int] | None = None
    source: str = ""  # where it came from, for the report ("model metadata", a folder, a file)
    model_sha256: str = ""  # a reference built by a hospital: the model whose scores it holds


def spec(name: str) -> StatSpec:
    """Binning of ``name`` (an image statistic or ``score:<label>``)."""
    if name.startswith(SCORE_PREFIX):
        return SCORE_STAT
    if name not in IMAGE_STATS:
        raise ReferenceError(f"unknown statistic {name!r}; known: {', '.join(IMAGE_STATS)} and score:<label>")
    return IMAGE_STATS[name]


def edges(name: str) -> list[float]:
    return spec(name).edges()


def image_statistics(model_input: NDArray[np.float32]) -> tuple[dict[str, float], list[int]]:
    """(per-image scalars {brightness, contrast, sharpness}, the image's ``intensity`` bin counts).

    ``model_input`` is [H, W] or [1, 1, H, W] in [0, 1] (``to_model_input``'s output).
    """
    x = np.asarray(model_input, dtype=np.float64)
    x = x.reshape(x.shape[-2:])
    diffs = np.concatenate([np.abs(np.diff(x, axis=0)).ravel(), np.abs(np.diff(x, axis=1)).ravel()])
    values = {
        "brightness": float(x.mean()),
        "contrast": float(x.std()),
        "sharpness": float(diffs.mean()) if diffs.size else 0.0,
    }
    return values, bin_counts("intensity", x.ravel())


def bin_counts(name: str, values: Iterable[float] | NDArray[np.float64]) -> list[int]:
    """Counts of ``values`` in the fixed bins of ``name`` (out-of-range values in the end bins)."""
    s = spec(name)
    arr = np.asarray(list(values) if not isinstance(values, np.ndarray) else values, dtype=np.float64).ravel()
    arr = arr[np.isfinite(arr)]
    idx = np.clip(np.floor((arr - s.lo) / (s.hi - s.lo) * s.bins).astype(np.int64), 0, s.bins - 1)
    return np.bincount(idx, minlength=s.bins).astype(int).tolist()


def site_counts(
    model_inputs: Iterable[NDArray[np.float32]], probabilities: NDArray[np.float32], labels: Sequence[str]
) -> dict[str, list[int]]:
    """All histograms of one site: what a site sends for the reference (counts only).

    ``model_inputs``: each [H, W] or [1, 1, H, W]; ``probabilities``: [N, C] in the order of
    ``labels``. The server adds the sites' dicts key by key and calls :func:`reference_json`.
    """
    probs = np.asarray(probabilities, dtype=np.float64).reshape(-1, len(labels))
    scalars: dict[str, list[float]] = {name: [] for name in PER_IMAGE}
    intensity = np.zeros(IMAGE_STATS["intensity"].bins, dtype=np.int64)
    n = 0
    for image in model_inputs:
        values, counts = image_statistics(image)
        for name in PER_IMAGE:
            scalars[name].append(values[name])
        intensity += np.asarray(counts, dtype=np.int64)
        n += 1
    if n != probs.shape[0]:
        raise ReferenceError(f"{n} images but {probs.shape[0]} rows of probabilities: pass one row per image")
    out = {"intensity": intensity.tolist()}
    out.update({name: bin_counts(name, vals) for name, vals in scalars.items()})
    out.update({SCORE_PREFIX + label: bin_counts(SCORE_PREFIX + label, probs[:, i]) for i, label in enumerate(labels)})
    return out


def add_counts(parts: Iterable[Mapping[str, Sequence[int]]]) -> dict[str, list[int]]:
    """Bin-by-bin sum of several sites' :func:`site_counts` (every part must have the same keys)."""
    total: dict[str, NDArray[np.int64]] = {}
    for part in parts:
        if total and set(part) != set(total):
            raise ReferenceError(f"sites disagree on the statistics: {sorted(total)} vs {sorted(part)}")
        for name, counts in part.items():
            arr = np.asarray(counts, dtype=np.int64)
            total[name] = total[name] + arr if name in total else arr
    return {name: arr.tolist() for name, arr in total.items()}


def reference_json(
    counts: Mapping[str, Sequence[int]], n_images: int, input_size: tuple[int, int] | None = None, *, model_sha256: str | None = None
) -> str:
    """The ``fedxray.reference`` metadata value for summed ``counts`` over ``n_images`` images.

    Checks every histogram against the fixed bins and raises ReferenceError listing every problem.
    """
    problems = []
    if not isinstance(n_images, int) or n_images < 1:
        problems.append(f"n_images must be a positive int, got {n_images!r}")
    stats = {}
    for name, values in counts.items():
        try:
            s = spec(name)
        except ReferenceError as err:
            problems.append(str(err))
            continue
        vals = [int(v) for v in values]
        if len(vals) != s.bins or min(vals, default=0) < 0:
            problems.append(f"{name}: expected {s.bins} non-negative counts, got {len(vals)} values")
            continue
        stats[name] = {"edges": s.edges(), "counts": vals}
    if not any(name.startswith(SCORE_PREFIX) for name in counts):
        problems.append("no score:<label> histogram: the model's score distribution is part of the reference")
    for name in IMAGE_STATS:
        if name not in counts:
            problems.append(f"missing statistic {name!r}")
    if problems:
        raise ReferenceError("invalid drift reference: " + "; ".join(problems))
    doc: dict[str, object] = {"schema": SCHEMA, "n_images": n_images, "statistics": stats}
    if input_size is not None:
        doc["input_size"] = [int(input_size[0]), int(input_size[1])]
    if model_sha256:
        doc["model_sha256"] = model_sha256
    return json.dumps(doc, separators=(",", ":"))


def parse_reference(text: str, source: str = "") -> Reference:
    """Read a ``fedxray.reference`` JSON string; ReferenceError names what is wrong."""
    try:
        doc = json.loads(text)
    except ValueError as err:
        raise ReferenceError(f"drift reference {source or ''} is not JSON ({err}); rebuild it with reference_json").strip() from err
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        raise ReferenceError(f"drift reference {source} has schema {doc.get('schema') if isinstance(doc, dict) else None!r}; "
                             f"this fl-predict reads {SCHEMA!r}")
    stats = {}
    for name, hist in (doc.get("statistics") or {}).items():
        try:
            s = spec(name)
            counts = [float(c) for c in hist["counts"]]
            hist_edges = [float(e) for e in hist["edges"]]
        except (ReferenceError, KeyError, TypeError, ValueError) as err:
            raise ReferenceError(f"drift reference {source}: statistic {name!r} is malformed ({err})") from err
        if len(counts) != s.bins or not np.allclose(hist_edges, s.edges()):
            raise ReferenceError(f"drift reference {source}: {name!r} does not use the fixed bins of {SCHEMA}")
        stats[name] = Histogram(hist_edges, counts)
    size = doc.get("input_size")
    return Reference(int(doc.get("n_images") or 0), stats, tuple(size) if size else None, source, str(doc.get("model_sha256") or ""))


#: L2 norm by which one image can move :func:`noised_image_counts` (one count in each of three
#: per-image histograms, a unit-sum intensity histogram): what the site's noise is calibrated to.
IMAGE_COUNTS_SENSITIVITY = 2.0


def noised_image_counts(model_inputs: Iterable[NDArray[np.float32]], sigma: float,
                        generator: np.random.Generator) -> dict[str, list[float]]:
    """A site's image statistics for the drift reference, with N(0, sigma^2) noise on every count.

    ``intensity`` is the sum of each image's grey-level proportions (so it counts images, not
    pixels); :func:`reference_from_sites` scales it back to pixels.
    """
    scalars: dict[str, list[float]] = {name: [] for name in PER_IMAGE}
    intensity = np.zeros(IMAGE_STATS["intensity"].bins, dtype=np.float64)
    for image in model_inputs:
        values, counts = image_statistics(image)
        for name in PER_IMAGE:
            scalars[name].append(values[name])
        c = np.asarray(counts, dtype=np.float64)
        intensity += c / max(c.sum(), 1.0)
    out = {"intensity": intensity}
    out.update({name: np.asarray(bin_counts(name, vals), dtype=np.float64) for name, vals in scalars.items()})
    return {name: (v + generator.normal(0.0, sigma, v.size)).tolist() for name, v in out.items()}


def rebin_scores(pos: Sequence[float], neg: Sequence[float], edges_in: Sequence[float]) -> list[float]:
    """Score counts of evaluation histograms (any bin edges) in the reference's fixed score bins.

    Each input bin's count goes to the score bin holding its midpoint in logit space (the bins of
    ``common.metrics.EVAL_EDGES`` are equal in logit), so the total is kept.
    """
    e = np.clip(np.asarray(edges_in, dtype=np.float64), 1e-6, 1 - 1e-6)
    logit = np.log(e / (1 - e))
    mid = 1.0 / (1.0 + np.exp(-(logit[:-1] + logit[1:]) / 2.0))
    total = np.asarray(pos, dtype=np.float64) + np.asarray(neg, dtype=np.float64)
    out = np.zeros(SCORE_STAT.bins)
    np.add.at(out, np.clip((mid * SCORE_STAT.bins).astype(np.int64), 0, SCORE_STAT.bins - 1), total)
    return np.clip(out, 0.0, None).tolist()  # noised counts: clipped once, after summing


def reference_from_sites(image_counts: Sequence[Mapping[str, Sequence[float]]], scores: Mapping[str, Sequence[float]],
                         input_size: tuple[int, int]) -> str:
    """The ``fedxray.reference`` value from the sites' noised image counts and the pooled score counts.

    Noised sums are clipped at zero and rounded; ``intensity`` goes back to pixel counts.
    """
    summed: dict[str, NDArray[np.float64]] = {}
    for part in image_counts:
        for name, counts in part.items():
            arr = np.asarray(counts, dtype=np.float64)
            summed[name] = summed[name] + arr if name in summed else arr
    counts = {name: np.clip(np.rint(arr), 0, None).astype(int).tolist() for name, arr in summed.items()}
    pixels = input_size[0] * input_size[1]
    if "intensity" in summed:
        counts["intensity"] = np.clip(np.rint(summed["intensity"] * pixels), 0, None).astype(int).tolist()
    for name, values in scores.items():
        counts[name] = np.clip(np.rint(np.asarray(values, dtype=np.float64)), 0, None).astype(int).tolist()
    n_images = max(1, int(round(sum(counts.get("brightness", [1])))))
    return reference_json(counts, n_images, input_size)
