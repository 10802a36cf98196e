"""Synthetic chest radiographs: a parametric PA/AP chest with an optional lung opacity.

Real chest X-rays cannot be shipped with the project, but tests, demos and the federated
simulation need hospitals full of DICOM files whose label is learnable (and not trivially so).
The phantom is drawn in display space (float32 in [0, 1], bone bright, air dark):

- body outline (soft tissue), two lung fields (dark) with diaphragm domes and faint vascular
  markings, posterior ribs and clavicles, spine, mediastinum and heart shadow;
- per-patient anatomy (size, position, rotation of a few degrees, heart size, lung heights,
  rib spacing, exposure), drawn once per patient by ``sample_anatomy``;
- per-image changes (small shift/rotation, breathing, fresh noise) for follow-up images;
- for the positive class, an ``Opacity``: a soft, irregular consolidation inside one lung
  whose size, place and density vary and drift slightly between follow-ups.

Everything is a pure function of its arguments and a ``numpy.random.Generator``: the same seed
gives the same pixels, bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

# Display-space brightness of each tissue (added together; see render_phantom).
AIR = 0.05
SOFT_TISSUE = 0.58
LUNG_DARKENING = 0.36
HEART = 0.03
SPINE = 0.06
RIB = 0.10
CLAVICLE = 0.10


@dataclass(frozen=True)
class Anatomy:
    """One patient's body; lengths are in half-heights of the image (the image spans v in [-1, 1])."""

    scale: float  # overall body size (1 = a typical adult filling the frame)
    shift_u: float  # horizontal offset of the body centre
    shift_v: float  # vertical offset
    rotation_deg: float  # in-plane rotation, a few degrees
    lung_height_r: float  # half-height of the right lung (image left in PA)
    lung_height_l: float  # half-height of the left lung
    lung_width: float  # half-width of each lung
    heart_width: float  # half-width of the heart shadow (cardiothoracic ratio)
    heart_height: float
    rib_spacing: float  # vertical distance between posterior ribs
    rib_curve: float  # curvature of the rib arcs
    exposure: float  # global brightness change of the soft tissue (patient thickness)
    marking_seed: int  # seed of the patient's lung markings (stable across follow-ups)


@dataclass(frozen=True)
class Opacity:
    """A pneumonia-like consolidation: a soft irregular blob inside one lung."""

    side: int  # -1 right lung (image left in PA), +1 left lung
    u: float  # centre within the lung, as a fraction of the lung half-width (-1..1)
    v: float  # centre within the lung, as a fraction of the lung half-height (-1..1)
    radius: float  # in half-heights of the image
    intensity: float  # added display brightness at the centre
    lobes: tuple[tuple[float, float, float], ...]  # (du, dv, weight) of the sub-blobs


def sample_anatomy(rng: np.random.Generator) -> Anatomy:
    """Draw one patient's anatomy."""
    return Anatomy(
        scale=float(rng.uniform(0.86, 1.04)),
        shift_u=float(rng.normal(0.0, 0.035)),
        shift_v=float(rng.normal(0.0, 0.03)),
        rotation_deg=float(rng.uniform(-4.0, 4.0)),
        lung_height_r=float(rng.uniform(0.56, 0.64)),
        lung_height_l=float(rng.uniform(0.58, 0.67)),
        lung_width=float(rng.uniform(0.27, 0.32)),
        heart_width=float(rng.uniform(0.28, 0.36)),
        heart_height=float(rng.uniform(0.19, 0.25)),
        rib_spacing=float(rng.uniform(0.135, 0.155)),
        rib_curve=float(rng.uniform(0.8, 1.3)),
        exposure=float(rng.normal(0.0, 0.03)),
        marking_seed=int(rng.integers(0, 2**31 - 1)),
    )


def sample_opacity(rng: np.random.Generator) -> Opacity:
    """Draw a consolidation: size, place (lower zones more often) and density vary widely."""
    n_lobes = int(rng.integers(1, 4))
    lobes = tuple((float(rng.normal(0, 0.5)), float(rng.normal(0, 0.5)), float(rng.uniform(0.5, 1.0))) for _ in range(n_lobes))
    return Opacity(
        side=int(rng.choice([-1, 1])),
        u=float(rng.uniform(-0.45, 0.45)),
        v=float(np.clip(rng.normal(0.2, 0.35), -0.6, 0.6)),
        radius=float(rng.uniform(0.11, 0.21)),
        intensity=float(rng.uniform(0.25, 0.45)),
        lobes=lobes,
    )


def follow_up(anatomy: Anatomy, opacity: Opacity | None, rng: np.random.Generator) -> tuple[Anatomy, Opacity | None]:
    """The same patient on another day: slightly repositioned, the opacity slightly changed."""
    moved = replace(
        anatomy,
        shift_u=anatomy.shift_u + float(rng.normal(0, 0.015)),
        shift_v=anatomy.shift_v + float(rng.normal(0, 0.015)),
        rotation_deg=anatomy.rotation_deg + float(rng.normal(0, 0.8)),
        lung_height_r=anatomy.lung_height_r * float(rng.uniform(0.97, 1.03)),
        lung_height_l=anatomy.lung_height_l * float(rng.uniform(0.97, 1.03)),
        exposure=anatomy.exposure + float(rng.normal(0, 0.01)),
    )
    if opacity is None:
        return moved, None
    changed = replace(
        opacity,
        u=float(np.clip(opacity.u + rng.normal(0, 0.05), -0.6, 0.6)),
        v=float(np.clip(opacity.v + rng.normal(0, 0.05), -0.7, 0.7)),
        radius=opacity.radius * float(rng.uniform(0.85, 1.15)),
        intensity=opacity.intensity * float(rng.uniform(0.8, 1.2)),
    )
    return moved, changed


def render_phantom(
    anatomy: Anatomy,
    shape: tuple[int, int],
    rng: np.random.Generator,
    *,
    opacity: Opacity | None = None,
    view: str = "PA",
    noise: float = 0.012,
) -> np.ndarray:
    """Draw the radiograph: float32 [rows, cols] in [0, 1], bone bright.

    ``view`` "AP" magnifies the heart (it is further from the detector). ``noise`` is the
    standard deviation of white noise in display units; ``rng`` supplies it.
    """
    # Anatomy is smooth (edges several pixels wide): draw it at half resolution, upsample, and add
    # the noise at full resolution. This quarters the cost of the slowest step of generation.
    coarse = (max(16, (shape[0] + 1) // 2), max(16, (shape[1] + 1) // 2))
    img = _resize_bilinear(_anatomy_image(anatomy, coarse, opacity, view), shape)
    img += rng.normal(0.0, noise, size=shape)
    return np.clip(img, 0.0, 1.0).astype(np.float32)


def _anatomy_image(anatomy: Anatomy, shape: tuple[int, int], opacity: Opacity | None, view: str) -> np.ndarray:
    """Noise-free phantom at ``shape`` (float64, not clipped)."""
    u, v = _grid(shape, anatomy)
    s = anatomy.scale
    img = np.full(shape, AIR, dtype=np.float64)

    body = _soft(np.abs(u) - _torso_half_width(v, s), 0.03)
    img += body * (SOFT_TISSUE + anatomy.exposure + 0.05 * np.clip(v, 0, 1))  # thicker abdomen

    lungs = np.zeros(shape)
    lung_boxes = {}
    for side, height in ((-1, anatomy.lung_height_r), (1, anatomy.lung_height_l)):
        hu, hv = anatomy.lung_width * s, height * s
        cu, cv = side * (0.1 * s + hu), -0.72 * s + hv
        lung_boxes[side] = (cu, cv, hu, hv)
        lungs = np.maximum(lungs, _soft(_lung_shape(u - cu, v - cv, hu, hv, side), 0.02))
    heart_scale = 1.12 if view.upper() == "AP" else 1.0
    hu_, hv_ = _rotate(u - 0.13 * s, v - 0.33 * s, 20.0)
    heart = _soft(_ellipse(hu_, hv_, anatomy.heart_width * s * heart_scale, anatomy.heart_height * s * heart_scale), 0.025)
    mediastinum = _soft(_superellipse(u - 0.01 * s, v + 0.3 * s, 0.12 * s, 0.55 * s, 3.0), 0.025)
    spine = _soft(np.abs(u) / (0.06 * s) - 1.0, 0.02) * body
    vertebrae = 0.7 + 0.3 * np.cos(2 * math.pi * v / (anatomy.rib_spacing * s))

    markings = _smooth_noise(shape, np.random.default_rng(anatomy.marking_seed), cells=16)
    lung_field = lungs * (1.0 - heart) * (1.0 - mediastinum)
    img -= lung_field * (LUNG_DARKENING - 0.04 * markings)
    img += (heart + mediastinum).clip(0, 1) * HEART
    img += spine * SPINE * vertebrae

    ribs = _ribs(u, v, s, anatomy) * (0.35 + 0.65 * lungs)
    img += body * (RIB * ribs + CLAVICLE * _clavicles(u, v, s))

    if opacity is not None:
        img += lung_field * _opacity_map(u, v, lung_boxes, opacity)
    return img


# --------------------------------------------------------------------------- geometry


def _grid(shape: tuple[int, int], anatomy: Anatomy) -> tuple[np.ndarray, np.ndarray]:
    """Image coordinates (u right, v down; v spans [-1, 1]) in the patient's rotated frame."""
    rows, cols = shape
    v = (np.arange(rows, dtype=np.float64) + 0.5) / rows * 2.0 - 1.0
    u = ((np.arange(cols, dtype=np.float64) + 0.5) / cols * 2.0 - 1.0) * (cols / rows)
    uu, vv = np.meshgrid(u - anatomy.shift_u, v - anatomy.shift_v)
    return _rotate(uu, vv, anatomy.rotation_deg)


def _rotate(u: np.ndarray, v: np.ndarray, degrees: float) -> tuple[np.ndarray, np.ndarray]:
    a = math.radians(degrees)
    return u * math.cos(a) + v * math.sin(a), -u * math.sin(a) + v * math.cos(a)


def _soft(distance: np.ndarray, edge: float) -> np.ndarray:
    """1 inside (distance < 0), 0 outside, with a smooth edge about ``edge`` wide."""
    return 0.5 * (1.0 - np.tanh(distance / edge))


def _ellipse(u: np.ndarray, v: np.ndarray, a: float, b: float) -> np.ndarray:
    """Approximate signed distance (in units of b) to an ellipse with half-axes a, b."""
    return (np.sqrt((u / a) ** 2 + (v / b) ** 2) - 1.0) * min(a, b)


def _superellipse(u: np.ndarray, v: np.ndarray, a: float | np.ndarray, b: float, p: float) -> np.ndarray:
    return ((np.abs(u / a) ** p + np.abs(v / b) ** p) ** (1.0 / p) - 1.0) * np.minimum(a, b)


def _lung_shape(u: np.ndarray, v: np.ndarray, hu: float, hv: float, side: int) -> np.ndarray:
    """Signed distance to a lung centred at (0, 0) of half-size (hu, hv): rounded apex, straight
    medial border, broad base with a domed diaphragm and a deep lateral costophrenic angle."""
    x = side * u + hu  # 0 at the medial border, 2 hu at the widest lateral point
    t = np.clip((v + hv) / (2.0 * hv), 0.0, 1.0)  # 0 at the apex, 1 at the base
    medial = hu * 0.9 * (1.0 - np.sqrt(np.clip(t / 0.3, 0.0, 1.0)))
    lateral = hu * (1.0 + 0.95 * np.sqrt(np.clip(t / 0.55, 0.0, 1.0)))
    base = hv * (1.0 - 0.14 * np.clip(1.0 - ((x - hu) / hu) ** 2, 0.0, 1.0))
    return np.maximum.reduce([medial - x, x - lateral, v - base, -(v + hv)])


def _torso_half_width(v: np.ndarray, s: float) -> np.ndarray:
    """Neck at the top, shoulders sloping out to the chest wall, slight taper to the abdomen."""
    shoulders = 0.5 * (1.0 + np.tanh((v + 0.8 * s) / (0.08 * s)))
    return 0.2 * s + 0.7 * s * shoulders - 0.06 * s * np.clip(v, 0, 1)


def _ribs(u: np.ndarray, v: np.ndarray, s: float, anatomy: Anatomy) -> np.ndarray:
    """Posterior ribs: arcs leaving the spine, rising slightly then curving down laterally."""
    out = np.zeros_like(u)
    au = np.abs(u)
    lateral = _soft(au - 0.8 * s, 0.04) * _soft(0.06 * s - au, 0.015)
    for i in range(10):
        v0 = -0.8 * s + i * anatomy.rib_spacing * s
        centre = v0 - 0.1 * au + anatomy.rib_curve * 0.5 * au**2 / s
        out += np.exp(-(((v - centre) / (0.025 * s)) ** 2))
    return np.clip(out, 0.0, 1.2) * lateral * _soft(v - 0.5 * s, 0.08)


def _clavicles(u: np.ndarray, v: np.ndarray, s: float) -> np.ndarray:
    au = np.abs(u)
    centre = -0.8 * s + 0.15 * au
    band = np.exp(-(((v - centre) / (0.03 * s)) ** 2))
    return band * _soft(au - 0.6 * s, 0.04) * _soft(0.07 * s - au, 0.02)


def _opacity_map(u: np.ndarray, v: np.ndarray, lung_boxes: dict[int, tuple[float, float, float, float]], op: Opacity) -> np.ndarray:
    """Sum of soft Gaussian lobes around the opacity centre, peak ~ ``op.intensity``."""
    cu, cv, hu, hv = lung_boxes[op.side]
    u0 = cu + op.u * hu
    v0 = cv + op.v * hv
    out = np.exp(-((u - u0) ** 2 + (v - v0) ** 2) / (2 * op.radius**2))
    for du, dv, w in op.lobes:
        r = op.radius * (0.5 + 0.5 * w)
        out += w * np.exp(-((u - u0 - du * op.radius) ** 2 + (v - v0 - dv * op.radius) ** 2) / (2 * r**2))
    peak = max(float(out.max()), 1e-6)
    return op.intensity * np.minimum(out / peak, 1.0) * (0.75 + 0.25 * np.tanh(out))


def _smooth_noise(shape: tuple[int, int], rng: np.random.Generator, cells: int) -> np.ndarray:
    """Low-frequency noise in [-1, 1]: a coarse random grid, bilinearly upsampled."""
    coarse = rng.normal(0.0, 1.0, size=(cells + 1, cells + 1))
    return np.clip(_resize_bilinear(coarse, shape), -2.5, 2.5) / 2.5


def _resize_bilinear(arr: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear resize with corner pixels aligned (pure numpy: deterministic everywhere)."""
    rows, cols = shape
    h, w = arr.shape
    y = np.linspace(0.0, h - 1.0, rows)
    x = np.linspace(0.0, w - 1.0, cols)
    y0 = np.minimum(y.astype(np.int64), h - 2)
    x0 = np.minimum(x.astype(np.int64), w - 2)
    fy = (y - y0)[:, None]
    fx = (x - x0)[None, :]
    top = arr[y0][:, x0] * (1 - fx) + arr[y0][:, x0 + 1] * fx
    bottom = arr[y0 + 1][:, x0] * (1 - fx) + arr[y0 + 1][:, x0 + 1] * fx
    return top * (1 - fy) + bottom * fy
