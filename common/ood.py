"""The image check of the intended-use gate: an out-of-distribution score from the model's fixed features.

Headers can be wrong or absent, so the gate also looks at the pixels, through the model's own
eyes: the features of its fixed front end (``common.models.split_features``: the scattering
coefficients of a ScatterNet, whatever stands before them) or, for a CNN, its penultimate layer.

**Descriptor** (per image, :class:`Descriptor`). From the features ``T`` [N, K, h, w]:

* the texture profile: ``log(mean over the image of each order-1 scattering channel)`` (J x L
  channels: how much structure there is at each scale and orientation; ribs, spine and clavicles
  give a chest radiograph its own profile, and a rotated image has it turned by 90 degrees),
* where the structure is: ``log`` of the order-1 energy averaged on a 4 x 4 grid,

each centred on its own mean (so a brighter or a more contrasted exposure does not count as
different), concatenated and scaled to unit length. A CNN's penultimate vector [N, K] is averaged
in 32 groups of channels, logged and centred the same way. Unit length matters for privacy: one
image moves a sum of descriptors by at most 1.

**Score** (:class:`OodScore`, an ``nn.Module`` exported in the ONNX graph as ``ood_score`` [N]):
``||u - mean||^2 / spread``, where ``mean`` is the sites' mean descriptor and ``spread`` =
``1 - ||mean||^2`` the mean squared distance of their images to it (for unit vectors), so a
typical training image scores about 1.

**Reference and cut-off, released under DP** (client/gate_stats.py, server/gate.py): each site
releases the noised sum of its training images' descriptors and their noised count once per run
(the scattering features never change, so any round will do); the coordinator pools them into
the reference and sends it back; in the last round each site releases a noised histogram of its
validation images' scores against that reference (:data:`SCORE_EDGES`). The cut-off is
:data:`MARGIN` times the 98th percentile of the pooled scores, estimated from the noised
histogram's quartiles on a log scale (the quartiles of ~1,000 images are barely moved by the
noise, a 2% tail count is not); it therefore refuses well under 2% of the sites' validation images,
and the margin lets radiographs of other chest populations through (docs/clinic.md has the figures).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray
from torch import nn

from common.intended_use import OOD_METADATA_KEY as METADATA_KEY  # noqa: F401  (re-exported)
from common.intended_use import OOD_OUTPUT as OUTPUT
from common.intended_use import OOD_SCHEMA as SCHEMA
from common.intended_use import OodError as OodError
from common.intended_use import parse_ood_metadata as parse_ood_metadata
from common.scattering import Scattering2D

REFERENCE_SCHEMA = "fedxray.gate-reference/1"
EPS = 1e-4  # added before the log: order-1 coefficients of a flat image are 0
GRID = 4  # where the structure is: a GRID x GRID map of the order-1 energy
GROUPS = 32  # a CNN's penultimate channels are averaged in this many groups
MARGIN = 3.0  # cut-off = MARGIN x the estimated 98th percentile of the validation scores
REFUSE_SHARE = 0.02  # the percentile the cut-off is built on (refuse at most this share of the sites' images)
Z98 = 2.0537  # standard normal quantile at 0.98
# Score histogram bins: 0, then 1/8 .. 64 in 19 log-spaced steps (two per octave), then infinity.
SCORE_EDGES: tuple[float, ...] = (0.0, *(float(v) for v in np.geomspace(1 / 8, 64, 19)), math.inf)


# --------------------------------------------------------------------------- descriptor (torch)


class Descriptor(nn.Module):
    """Fixed features -> unit descriptor [N, D] (module docstring). No trainable parameters."""

    def __init__(self, front_end: nn.Module, order1: tuple[int, int] | None, size: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.front_end = front_end
        self.order1 = order1  # channel range of the order-1 scattering coefficients; None: a feature vector
        self.size = size  # the feature map's (h, w): fixed, so the exported graph has static pooling

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return describe(self.front_end(image), self.order1, self.size)


def describe(features: torch.Tensor, order1: tuple[int, int] | None, size: tuple[int, int] | None = None) -> torch.Tensor:
    """The unit descriptor of fixed features (4-D scattering maps with ``order1``, or 2-D vectors)."""
    if order1 is not None:
        first = features[:, order1[0] : order1[1]].abs()
        profile = torch.log(first.mean(dim=(2, 3)) + EPS)
        energy = first.mean(dim=1, keepdim=True)
        side_h, side_w = size if size is not None else (int(features.shape[2]), int(features.shape[3]))
        kh, kw = max(1, side_h // GRID), max(1, side_w // GRID)
        grid = F.avg_pool2d(energy[:, :, : kh * GRID, : kw * GRID], (kh, kw))
        where = torch.log(grid.flatten(1) + EPS)
        parts = [profile - profile.mean(dim=1, keepdim=True), where - where.mean(dim=1, keepdim=True)]
    else:
        flat = features.flatten(1).abs()
        k = flat.shape[1] // GROUPS * GROUPS
        groups = flat[:, :k].reshape(flat.shape[0], GROUPS, -1).mean(dim=2) if k else flat
        logged = torch.log(groups + EPS)
        parts = [logged - logged.mean(dim=1, keepdim=True)]
    u = torch.cat(parts, dim=1)
    return u / torch.sqrt((u * u).sum(dim=1, keepdim=True) + 1e-12)


class Penultimate(nn.Module):
    """A torchvision CNN (common.models.RadiographClassifier) up to its penultimate layer: [N, K]."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        m = self.model
        x = m.features((image - m.mean) / m.std)
        if m.final_relu:
            x = F.relu(x)
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


def descriptor_for(model: nn.Module) -> Descriptor:
    """The descriptor of ``model``: its fixed front end (split_features), else a CNN's penultimate layer."""
    from common.models import split_features

    front, _, _ = split_features(model)
    if front is not None:
        scattering = next((m for m in front.modules() if isinstance(m, Scattering2D)), None)
        if scattering is None:
            return Descriptor(front, None)
        return Descriptor(front, (1, 1 + scattering.J * scattering.L), scattering.out_size)
    if all(hasattr(model, a) for a in ("features", "mean", "std", "final_relu")):
        return Descriptor(Penultimate(model), None)
    raise OodError(f"{type(model).__name__} has neither a fixed front end nor a known penultimate layer: no image check")


def descriptors(descriptor: Descriptor, features: torch.Tensor | NDArray[np.float32], *, batch: int = 256) -> NDArray[np.float64]:
    """Unit descriptors [N, D] of precomputed front-end features (what a site has cached)."""
    x = torch.as_tensor(np.asarray(features), dtype=torch.float32)
    with torch.inference_mode():
        out = [describe(x[i : i + batch], descriptor.order1, descriptor.size) for i in range(0, x.shape[0], batch)]
    return torch.cat(out).double().numpy() if out else np.zeros((0, 0))


class OodScore(nn.Module):
    """Images [N, 1, H, W] in [0, 1] -> OOD score [N]: ``||u - mean||^2 / spread`` (module docstring)."""

    def __init__(self, descriptor: Descriptor, reference: GateReference) -> None:
        super().__init__()
        self.descriptor = descriptor
        self.register_buffer("mean", torch.tensor(reference.mean, dtype=torch.float32))
        self.spread = float(reference.spread)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        d = self.descriptor(image) - self.mean
        return (d * d).sum(dim=1) / self.spread


# --------------------------------------------------------------------------- reference (numpy)


@dataclass(frozen=True)
class GateReference:
    """The pooled reference: mean unit descriptor, its spread, and the (noised) number of images behind it."""

    mean: list[float]
    spread: float
    n_images: float

    def to_json(self) -> str:
        return json.dumps({"schema": REFERENCE_SCHEMA, **asdict(self)}, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> GateReference:
        try:
            doc = json.loads(text)
            if doc.get("schema") != REFERENCE_SCHEMA:
                raise ValueError(f"schema {doc.get('schema')!r}")
            mean = [float(v) for v in doc["mean"]]
            ref = cls(mean, float(doc["spread"]), float(doc["n_images"]))
        except (ValueError, TypeError, KeyError, AttributeError) as err:
            raise OodError(f"gate reference is malformed ({err}); expected {REFERENCE_SCHEMA} from the coordinator") from err
        if not mean or not all(math.isfinite(v) for v in mean) or not (0 < ref.spread <= 4) or not math.isfinite(ref.n_images):
            raise OodError("gate reference has non-finite values or a spread outside (0, 4]")
        return ref

    def scores(self, u: NDArray[np.float64]) -> NDArray[np.float64]:
        """The score of unit descriptors [N, D] (the numpy twin of :class:`OodScore`)."""
        u = np.asarray(u, dtype=np.float64)
        if u.ndim != 2 or u.shape[1] != len(self.mean):
            raise OodError(f"descriptors of {u.shape[-1] if u.ndim else 0} values, the reference has {len(self.mean)}: "
                           "the reference belongs to another model")
        d = u - np.asarray(self.mean)
        return (d * d).sum(axis=1) / self.spread


def noised_sums(u: NDArray[np.float64], std: float, rng: np.random.Generator) -> dict[str, list[float] | float]:
    """A site's release for the reference: the sum of its unit descriptors and its count, N(0, std^2) on each.

    One image moves (sum, count) by at most sqrt(2) in L2 norm (a unit vector and 1).
    """
    u = np.asarray(u, dtype=np.float64)
    total = u.sum(axis=0) + rng.normal(0.0, std, u.shape[1])
    return {"gate-sum": total.tolist(), "gate-n": float(u.shape[0] + rng.normal(0.0, std))}


#: L2 norm by which one image moves :func:`noised_sums`: what its noise is calibrated to.
SUMS_SENSITIVITY = math.sqrt(2.0)


def pool_reference(parts: Iterable[Mapping[str, object]]) -> GateReference | None:
    """The reference from the sites' :func:`noised_sums` (None when no site sent any, or too few images).

    Sums are exact (math.fsum), so the same replies in any order give the same reference: the
    coordinator pools it during the run and the export rebuilds it from the run's history.
    """
    sums: list[NDArray[np.float64]] = []
    counts: list[float] = []
    for part in parts:
        s, c = part.get("gate-sum"), part.get("gate-n")
        if not isinstance(s, list | tuple) or not s or not isinstance(c, int | float):
            continue
        arr = np.asarray(s, dtype=np.float64)
        if sums and arr.shape != sums[0].shape:
            raise OodError(f"sites sent descriptors of {arr.size} and {sums[0].size} values: they run different models")
        sums.append(arr)
        counts.append(float(c))
    n = math.fsum(counts)
    if not sums or n < 1.0:
        return None
    mean = np.array([math.fsum(col) for col in np.stack(sums).T]) / n
    norm = float(np.linalg.norm(mean))
    if norm > 1.0:  # noise pushed the mean of unit vectors outside the unit ball: project it back
        mean /= norm
    spread = max(1.0 - float(mean @ mean), 1e-3)
    return GateReference([round(float(v), 7) for v in mean], round(spread, 7), round(n, 1))


def noised_histogram(scores: NDArray[np.float64], std: float, rng: np.random.Generator) -> list[float]:
    """Counts of ``scores`` in :data:`SCORE_EDGES` with N(0, std^2) on each (one image moves one count)."""
    counts, _ = np.histogram(np.asarray(scores, dtype=np.float64), bins=np.asarray(SCORE_EDGES))
    return (counts + rng.normal(0.0, std, counts.size)).tolist()


@dataclass(frozen=True)
class CutOff:
    """The cut-off and what it was estimated from (all figures estimated from noised counts)."""

    cutoff: float
    q98: float  # estimated 98th percentile of the validation scores
    margin: float
    validation_images: float  # noised total of the pooled histogram
    refused_estimate: float  # estimated share of validation images above the cut-off
    refused_sd: float  # its standard deviation from the noise alone
    noise_sd: float  # noise std on each pooled count

    def to_json(self, reference: GateReference, descriptor: str) -> str:
        doc = {"schema": SCHEMA, "output": OUTPUT, "descriptor": descriptor, "reference_images": reference.n_images,
               **{k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items()}}
        return json.dumps(doc, separators=(",", ":"))


def cutoff_from_histograms(hists: Sequence[Sequence[float]], noise_sd: float) -> CutOff:
    """The cut-off from the sites' noised score histograms (``noise_sd``: each site's std per count).

    The pooled counts are summed as released (no clipping: a clipped sum is biased upwards), the
    cumulative share is made non-decreasing, and the quartiles of log(score) are read from it by
    linear interpolation; the 98th percentile is that of a normal in log(score) with those
    quartiles. Raises :class:`OodError` when the pooled total is too small to read quartiles.
    """
    rows = [np.asarray(h, dtype=np.float64) for h in hists]
    if not rows or any(r.size != len(SCORE_EDGES) - 1 for r in rows):
        raise OodError(f"score histograms must have {len(SCORE_EDGES) - 1} bins (fedxray.ood/1)")
    pooled = np.sum(rows, axis=0)
    total = float(pooled.sum())
    sd_total = noise_sd * math.sqrt(len(rows) * pooled.size)
    if total < max(20.0, 4 * sd_total):
        raise OodError(f"the sites' validation images ({total:.0f} by the noised count) are too few to set the cut-off")
    inner = np.log(np.asarray(SCORE_EDGES[1:-1]))
    cdf = np.maximum.accumulate(np.clip(np.cumsum(pooled)[:-1] / total, 0.0, 1.0))
    cdf = cdf + np.arange(cdf.size) * 1e-12  # strictly increasing for interpolation

    def quantile(p: float) -> float:
        return float(np.interp(p, cdf, inner))

    q25, q50, q75 = quantile(0.25), quantile(0.5), quantile(0.75)
    q98 = math.exp(q50 + Z98 * max(q75 - q25, 1e-3) / 1.349)
    cutoff = MARGIN * q98
    above = np.asarray(SCORE_EDGES[:-1]) >= cutoff
    # the bin holding the cut-off counts in proportion (log scale) to the part above it
    k = int(np.searchsorted(np.asarray(SCORE_EDGES), cutoff, side="right")) - 1
    tail = float(pooled[above].sum())
    if 0 < k < pooled.size - 1:
        lo, hi = math.log(SCORE_EDGES[k]), math.log(SCORE_EDGES[k + 1])
        tail += float(pooled[k]) * (hi - math.log(cutoff)) / (hi - lo)
    n_tail = int(above.sum()) + 1
    return CutOff(cutoff=round(cutoff, 6), q98=round(q98, 6), margin=MARGIN, validation_images=round(total, 1),
                  refused_estimate=round(max(tail, 0.0) / total, 6),
                  refused_sd=round(noise_sd * math.sqrt(len(rows) * n_tail) / total, 6), noise_sd=noise_sd)
