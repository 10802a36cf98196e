"""The image check of the intended-use gate: an out-of-distribution score from the model's fixed features.

Headers can be wrong or absent, so the gate also looks at the pixels, through the model's own
eyes: the features of its fixed front end (``common.models.split_features``: the scattering
coefficients of a ScatterNet, whatever stands before them) or, for a CNN, its penultimate layer.

**Descriptor** (per image, :class:`Descriptor`): from the scattering maps [N, K, h, w] two parts,
each of unit length, concatenated and scaled by 1/sqrt(2) (a unit vector: one image moves a sum
of descriptors by at most 1, what the DP noise is calibrated to):

* texture: ``log`` of the mean of each order-1 channel (J x L: structure at each scale and
  orientation; a rotated image has it turned by 90 degrees) and of the order-1 energy on a
  :data:`GRID` x :data:`GRID` grid (where the structure is), each centred (exposure and contrast
  do not count);
* layout: the order-0 coefficients (local means) on the same grid, centred: where the image is
  bright and dark. Order-1/2 coefficients are moduli, blind to the sign of the image and to a
  half-turn of each wavelet; the layout is not (:func:`layout_sign`: inversion negates it).

A CNN's penultimate vector is averaged in 32 groups of channels, logged and centred: texture only.

**Score** (:class:`OodScore`, the ONNX graph's ``ood_score`` [N]; :meth:`GateReference.scores` is
its numpy twin), from the sites' mean descriptor ``m``: the texture part's squared distance to
its mean over ``1 - ||m_t||^2`` (the mean of that distance over unit vectors: a typical training
image scores about 1), times the odds that the image is the sites' radiographs turned upside down
or inverted (:func:`_log_odds`). The image is read three more ways (turned 180 degrees through the
same front end; inverted; both) and each reading competes with the image as it is: under the
isotropic model the distance assumes (variance ``spread / D`` per value) the log-odds of the best
is ``D / spread x m . (reading - u)``; less the prior log-odds :data:`PRIOR_LOG_ODDS` (turned or
inverted images are rare), clipped to [0, :data:`ODDS_CAP`], its ``exp`` is the factor. It is 1
for a radiograph the right way up, whatever its population (its distance decides), and large
for one that fits the reference far better turned or inverted. Continuous: runtimes agree. The layout stays out of the
distance: normalised per image, it says how an image is oriented more than what it shows.

**Reference and cut-off, released under DP** (client/gate_stats.py, server/gate.py): each site
releases the noised sum of its validation images' descriptors and their noised count once per
run (the scattering features never change, so any round will do); the coordinator pools them into
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

REFERENCE_SCHEMA = "fedxray.gate-reference/2"  # /2: texture and layout parts (/1 was texture only)
EPS = 1e-4  # added before the log: order-1 coefficients of a flat image are 0
GRID = 4  # the order-1 energy and the order-0 layout on a GRID x GRID map (coarse: framing varies between sites)
HALF = math.sqrt(0.5)  # the texture and the layout part each fill half of the unit length (squared)
GROUPS = 32  # a CNN's penultimate channels are averaged in this many groups
ODDS_CAP = 10.0  # the log-odds factor stops at e^10 = 22,026: far past any decision, far from float32 overflow
PRIOR_LOG_ODDS = math.log(100.0)  # prior: at most 1 image in 100 reaching the gate is turned or inverted
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
        self.grid = GRID if order1 is not None else 0  # side of the spatial grids; 0: texture only (a CNN)

    @property
    def values(self) -> int | None:
        """D, the descriptor's length (None for a CNN: it depends on its channel count)."""
        return None if self.order1 is None else self.order1[1] - self.order1[0] + 2 * GRID * GRID

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return describe(self.front_end(image), self.order1, self.size)


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / torch.sqrt((x * x).sum(dim=1, keepdim=True) + 1e-12)


def _centred(x: torch.Tensor) -> torch.Tensor:
    return x - x.mean(dim=1, keepdim=True)


def describe(features: torch.Tensor, order1: tuple[int, int] | None, size: tuple[int, int] | None = None) -> torch.Tensor:
    """The unit descriptor of fixed features (4-D scattering maps with ``order1``, or 2-D vectors)."""
    if order1 is None:
        flat = features.flatten(1).abs()
        k = flat.shape[1] // GROUPS * GROUPS
        groups = flat[:, :k].reshape(flat.shape[0], GROUPS, -1).mean(dim=2) if k else flat
        return _unit(_centred(torch.log(groups + EPS)))
    side_h, side_w = size if size is not None else (int(features.shape[2]), int(features.shape[3]))
    kh, kw = max(1, side_h // GRID), max(1, side_w // GRID)

    def on_grid(maps: torch.Tensor) -> torch.Tensor:  # [N, 1, h, w] -> [N, GRID * GRID], row by row
        return F.avg_pool2d(maps[:, :, : kh * GRID, : kw * GRID], (kh, kw)).flatten(1)

    first = features[:, order1[0] : order1[1]].abs()
    profile = torch.log(first.mean(dim=(2, 3)) + EPS)
    where = torch.log(on_grid(first.mean(dim=1, keepdim=True)) + EPS)
    texture = _unit(torch.cat([_centred(profile), _centred(where)], dim=1))
    layout = _unit(_centred(on_grid(features[:, : order1[0]].mean(dim=1, keepdim=True))))
    return torch.cat([texture, layout], dim=1) * HALF


def layout_sign(size: int, grid: int) -> NDArray[np.float64]:
    """+1 on the texture values, -1 on the layout: a descriptor times this is that of the inverted image.

    Order-1 moduli of ``1 - x`` equal those of ``x`` (the wavelets have zero mean); the centred
    local means change sign. An isometry: ``||u * sign - m|| = ||u - m * sign||``.
    """
    sign = np.ones(size)
    if grid:
        sign[size - grid * grid :] = -1.0
    return sign


@dataclass(frozen=True)
class _Terms:
    """What the score needs from a reference, for descriptors of ``size`` values (numpy float64)."""

    texture: int  # leading values that are the texture part
    scale: float  # the texture part's weight in the descriptor (1 without a layout)
    texture_mean: NDArray[np.float64]
    texture_spread: float
    mean: NDArray[np.float64]
    sign: NDArray[np.float64]  # layout_sign
    odds_scale: float  # D / spread: log-odds = odds_scale * m . (reading - u), see _log_odds


def _terms(reference: GateReference, grid: int) -> _Terms:
    mean = np.asarray(reference.mean, dtype=np.float64)
    size = mean.size
    texture = size - grid * grid if grid else size
    if texture <= 0:
        raise OodError(f"a reference of {size} values cannot hold a {grid} x {grid} layout: it belongs to another model")
    scale = HALF if grid else 1.0
    t_mean = mean[:texture] / scale
    t_mean = t_mean / max(1.0, float(np.linalg.norm(t_mean)))  # noise can push it outside the unit ball
    t_spread = max(1.0 - float(t_mean @ t_mean), 1e-3)
    return _Terms(texture, scale, t_mean, t_spread, mean, layout_sign(size, grid), size / reference.spread)


def _log_odds(u: NDArray[np.float64], turned: NDArray[np.float64], terms: _Terms) -> NDArray[np.float64]:
    """Log-odds of the best other reading (turned, inverted, both) against the image as it is [N].

    For unit vectors ``||u - m||^2 - ||r - m||^2 = 2 m . (r - u)``; over twice the per-value
    variance ``spread / D`` that is ``D / spread x m . (r - u)``.
    """
    readings = np.stack([turned, u * terms.sign, turned * terms.sign], axis=1) - u[:, None]
    return terms.odds_scale * (readings @ terms.mean).max(axis=1)


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
        # The scattering of the image as stored, before any intensity standardisation of the front end
        # (histogram equalisation): the check asks whether the image is a chest radiograph at all, and
        # equalising first would discard the grey-level layout that sets test patterns, inverted and other
        # images apart. It also keeps the check, its reference and its cut-off independent of the head's recipe.
        return Descriptor(scattering, (1, 1 + scattering.J * scattering.L), scattering.out_size)
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
    """Images [N, 1, H, W] in [0, 1] -> OOD score [N]: texture distance x odds of a turned/inverted reading."""

    def __init__(self, descriptor: Descriptor, reference: GateReference) -> None:
        super().__init__()
        self.descriptor = descriptor
        if descriptor.values is not None and descriptor.values != len(reference.mean):
            raise OodError(f"the reference has {len(reference.mean)} values, this model's descriptor {descriptor.values}: "
                           "the reference belongs to another model")
        terms = _terms(reference, descriptor.grid)
        self.texture, self.scale, self.texture_spread = terms.texture, terms.scale, terms.texture_spread
        self.odds_scale = terms.odds_scale
        self.turns = descriptor.grid > 0  # a CNN's descriptor has no layout: distance only
        self.register_buffer("texture_mean", torch.tensor(terms.texture_mean, dtype=torch.float32))
        self.register_buffer("mean", torch.tensor(terms.mean, dtype=torch.float32))
        self.register_buffer("sign", torch.tensor(terms.sign, dtype=torch.float32))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        u = self.descriptor(image)
        d = u[:, : self.texture] / self.scale - self.texture_mean
        distance = (d * d).sum(dim=1) / self.texture_spread
        if not self.turns:
            return distance
        turned = self.descriptor(torch.flip(image, dims=(2, 3)))
        readings = torch.stack([turned, u * self.sign, turned * self.sign], dim=1) - u[:, None]
        log_odds = torch.matmul(readings, self.mean).max(dim=1).values * self.odds_scale
        return distance * torch.exp(torch.clamp(log_odds - PRIOR_LOG_ODDS, 0.0, ODDS_CAP))


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

    def scores(self, u: NDArray[np.float64], turned: NDArray[np.float64] | None, *, grid: int) -> NDArray[np.float64]:
        """The score of unit descriptors [N, D] (the numpy twin of :class:`OodScore`).

        ``turned``: the descriptors of the same images turned upside down (None, and ``grid`` 0, for
        a descriptor without a layout); ``grid``: the descriptor's (:attr:`Descriptor.grid`).
        """
        u = np.asarray(u, dtype=np.float64)
        if u.ndim != 2 or u.shape[1] != len(self.mean):
            raise OodError(f"descriptors of {u.shape[-1] if u.ndim else 0} values, the reference has {len(self.mean)}: "
                           "the reference belongs to another model")
        terms = _terms(self, grid)
        d = u[:, : terms.texture] / terms.scale - terms.texture_mean
        distance = (d * d).sum(axis=1) / terms.texture_spread
        if not grid:
            return distance
        if turned is None or np.shape(turned) != u.shape:
            raise OodError("the score of a descriptor with a layout needs the descriptors of the turned images too")
        log_odds = _log_odds(u, np.asarray(turned, dtype=np.float64), terms)
        return distance * np.exp(np.clip(log_odds - PRIOR_LOG_ODDS, 0.0, ODDS_CAP))


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
