"""The acquisition profiles of the simulated hospitals: how each one would store a radiograph.

A profile is a modality (CR or DX), a Photometric Interpretation, a bit depth and stored range,
a rescale, windows or a VOI LUT, a transfer syntax, the share of files without File Meta, a
matrix and the site's small gain/contrast/noise response. :func:`site_profiles` draws varied
ones from six archetypes; simulations/acquisition.py writes radiographs with them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless, RLELossless

UNCOMPRESSED = frozenset({ExplicitVRLittleEndian, ImplicitVRLittleEndian})
COMPRESSED = frozenset({RLELossless, JPEG2000Lossless})


class ProfileError(ValueError):
    """An acquisition profile that cannot be written as valid DICOM; lists every problem."""


@dataclass(frozen=True)
class AcquisitionProfile:
    """How one site writes radiographs. Values in ``windows`` are in modality units (after rescale).

    ``stored_range`` holds the stored values that display black and display white map to before
    MONOCHROME1 inversion (MONOCHROME1 stores white at ``lo``). ``matrix`` is the site's native
    (rows, cols): synthetic images are rendered at it; real images keep their own size.
    """

    name: str  # descriptive, e.g. "cr-mono1-j2k"; not an identifier of anyone
    modality: str  # "CR" or "DX"
    photometric: str  # "MONOCHROME1" or "MONOCHROME2"
    bits_stored: int  # 8..16; bits allocated is 8 for 8, else 16
    stored_range: tuple[int, int]  # (lo, hi) stored values used by the image
    rescale: tuple[float, float] | None = None  # (slope, intercept); DX always writes (1, 0)
    windows: tuple[tuple[float, float], ...] = ()  # (center, width); the first is the default
    voi_lut_gamma: float | None = None  # store gamma-encoded values plus a VOI LUT Sequence undoing it
    transfer_syntax: str = ExplicitVRLittleEndian
    no_file_meta_fraction: float = 0.0  # share of files written without preamble/File Meta (implicit VR)
    matrix: tuple[int, int] = (320, 320)
    gain: float = 1.0  # display contrast scale around mid-grey
    contrast: float = 1.0  # gamma applied to the display image (1 = none)
    noise: float = 0.0  # std of extra white noise, display units
    manufacturer: str = "fedxray simulator"
    extra: dict[str, str] = field(default_factory=dict, compare=False)  # free notes for docs

    def __post_init__(self) -> None:
        problems = []
        if self.modality not in ("CR", "DX"):
            problems.append(f"modality {self.modality!r} (expected CR or DX)")
        if self.photometric not in ("MONOCHROME1", "MONOCHROME2"):
            problems.append(f"photometric {self.photometric!r} (expected MONOCHROME1 or MONOCHROME2)")
        if not 8 <= self.bits_stored <= 16:
            problems.append(f"bits_stored {self.bits_stored} (expected 8..16)")
        lo, hi = self.stored_range
        if not 0 <= lo < hi <= 2**self.bits_stored - 1:
            problems.append(f"stored_range {self.stored_range} (expected 0 <= lo < hi <= {2**self.bits_stored - 1})")
        if self.transfer_syntax not in UNCOMPRESSED | COMPRESSED:
            problems.append(f"transfer syntax {self.transfer_syntax} (supported: {sorted(UNCOMPRESSED | COMPRESSED)})")
        if self.no_file_meta_fraction and self.transfer_syntax not in UNCOMPRESSED:
            problems.append("files without File Meta must be uncompressed (implicit VR little endian)")
        if not 0.0 <= self.no_file_meta_fraction <= 1.0:
            problems.append(f"no_file_meta_fraction {self.no_file_meta_fraction} (expected 0..1)")
        if self.voi_lut_gamma is not None and (self.windows or self.rescale not in (None, (1.0, 0.0))):
            problems.append("a VOI LUT Sequence site must have no windows and no rescale")
        if self.voi_lut_gamma is not None and self.bits_stored > 12:
            problems.append("a VOI LUT Sequence site needs bits_stored <= 12 (one LUT entry per stored value)")
        if self.modality == "DX" and not self.windows and self.voi_lut_gamma is None:
            problems.append("DX For Presentation needs a window or a VOI LUT (PS3.3 C.8.11.3)")
        if self.modality == "DX" and self.rescale not in (None, (1.0, 0.0)):
            problems.append("DX requires rescale slope 1 and intercept 0 (PS3.3 C.8.11.3)")
        if problems:
            raise ProfileError(f"acquisition profile {self.name!r}: " + "; ".join(problems))

    @property
    def compressed(self) -> bool:
        return self.transfer_syntax in COMPRESSED

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description (for manifests and docs)."""
        out = asdict(self)
        out["transfer_syntax_name"] = UID(self.transfer_syntax).name
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AcquisitionProfile:
        """Inverse of ``to_dict`` (extra keys such as ``transfer_syntax_name`` are ignored)."""
        keys = set(cls.__dataclass_fields__)
        kwargs = {k: v for k, v in data.items() if k in keys}
        for name in ("stored_range", "matrix", "rescale"):
            if kwargs.get(name) is not None:
                kwargs[name] = tuple(kwargs[name])
        kwargs["windows"] = tuple(tuple(w) for w in kwargs.get("windows", ()))
        return cls(**kwargs)


# --------------------------------------------------------------------------- profiles

# The first three cover every reader feature (so the default of three sites exercises them);
# more sites cycle through the list with fresh jitter.
_ARCHETYPES: tuple[dict[str, Any], ...] = (
    dict(name="cr-mono1-12bit-j2k", modality="CR", photometric="MONOCHROME1", bits_stored=12,
         rescale=(0.5, -100.0), n_windows=2, transfer_syntax=JPEG2000Lossless, matrices=((320, 288), (320, 320))),
    dict(name="dx-14bit-rle", modality="DX", photometric="MONOCHROME2", bits_stored=14,
         rescale=(1.0, 0.0), n_windows=1, transfer_syntax=RLELossless, matrices=((320, 320), (336, 336))),
    dict(name="cr-10bit-voilut-nometa", modality="CR", photometric="MONOCHROME2", bits_stored=10,
         voi_lut=True, no_file_meta_fraction=0.5, transfer_syntax=ExplicitVRLittleEndian,
         matrices=((288, 256), (256, 256))),
    dict(name="cr-8bit-implicit", modality="CR", photometric="MONOCHROME2", bits_stored=8,
         transfer_syntax=ImplicitVRLittleEndian, matrices=((256, 256), (288, 288))),
    dict(name="dx-mono1-16bit", modality="DX", photometric="MONOCHROME1", bits_stored=16,
         rescale=(1.0, 0.0), n_windows=1, transfer_syntax=ExplicitVRLittleEndian, matrices=((384, 384), (400, 368))),
    dict(name="cr-16bit-rle-3windows", modality="CR", photometric="MONOCHROME2", bits_stored=16,
         rescale=(1.0, -1024.0), n_windows=3, transfer_syntax=RLELossless, matrices=((320, 288), (352, 352))),
)  # fmt: skip


def site_profiles(n_sites: int, seed: int) -> list[AcquisitionProfile]:
    """``n_sites`` varied acquisition profiles, deterministic in ``seed``.

    Site i takes archetype ``i % 6`` (so any three sites include a MONOCHROME1 site, a JPEG 2000
    site, an RLE site, a VOI LUT site and a site with files lacking File Meta); the seed jitters
    the stored range, windows, matrix, gain, contrast and noise.
    """
    if n_sites < 1:
        raise ProfileError(f"n_sites must be >= 1, got {n_sites}")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xAC0]))
    profiles = []
    for i in range(n_sites):
        arch = _ARCHETYPES[i % len(_ARCHETYPES)]
        top = 2 ** arch["bits_stored"] - 1
        lo = int(round(top * rng.uniform(0.01, 0.1)))
        hi = int(round(top * rng.uniform(0.85, 0.99)))
        rescale = arch.get("rescale")
        windows = _windows((lo, hi), rescale, arch.get("n_windows", 0), rng)
        matrices = arch["matrices"]
        suffix = "" if i < len(_ARCHETYPES) else f"-{i // len(_ARCHETYPES) + 1}"
        profiles.append(
            AcquisitionProfile(
                name=arch["name"] + suffix,
                modality=arch["modality"],
                photometric=arch["photometric"],
                bits_stored=arch["bits_stored"],
                stored_range=(lo, hi),
                rescale=rescale,
                windows=windows,
                voi_lut_gamma=round(float(rng.uniform(1.4, 2.0)), 3) if arch.get("voi_lut") else None,
                transfer_syntax=arch["transfer_syntax"],
                no_file_meta_fraction=arch.get("no_file_meta_fraction", 0.0),
                matrix=tuple(matrices[int(rng.integers(len(matrices)))]),
                gain=round(float(rng.uniform(0.9, 1.06)), 3),
                contrast=round(float(rng.uniform(0.85, 1.2)), 3),
                noise=round(float(rng.uniform(0.003, 0.012)), 4),
                manufacturer=f"fedxray simulator {arch['modality']} model {i % len(_ARCHETYPES) + 1}",
            )
        )
    return profiles


def _windows(
    stored_range: tuple[int, int], rescale: tuple[float, float] | None, n: int, rng: np.random.Generator
) -> tuple[tuple[float, float], ...]:
    """Windows in modality units: the first covers the whole stored range (with a small margin,
    so nothing is clipped), further ones are narrower "lung"/"bone" windows a viewer may offer."""
    if n == 0:
        return ()
    slope, intercept = rescale or (1.0, 0.0)
    m_lo, m_hi = slope * stored_range[0] + intercept, slope * stored_range[1] + intercept
    centre, width = (m_lo + m_hi) / 2.0, (m_hi - m_lo) * float(rng.uniform(1.02, 1.08))
    out = [(round(centre, 2), round(width + 1.0, 2))]
    for k in range(1, n):
        out.append((round(centre + (-1) ** k * 0.15 * width, 2), round(width * (0.6 - 0.1 * k), 2)))
    return tuple(out)
