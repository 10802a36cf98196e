"""How each simulated hospital stores its radiographs as DICOM (acquisition profiles).

Hospitals differ less in anatomy than in how their images reach the disk: CR or DX, MONOCHROME1
(stored inverted) or MONOCHROME2, 8 to 16 stored bits with or without a rescale, windows (one or
several), a VOI LUT Sequence, compressed transfer syntaxes, files without a File Meta header,
matrix size and a slightly different gain, contrast and noise. A reader that gets any of these
wrong produces images that look inverted, washed out or clipped, and a federated model then
learns the hospital instead of the disease. The profiles here exercise all of it.

The encoding is the exact inverse of the presentation chain (PS3.3 C.11: modality LUT -> VOI
LUT -> Presentation LUT / MONOCHROME1 inversion): a correct reader of a file written by
``write_radiograph`` returns the display image that was given, up to the site's small
gain/contrast/noise response and quantisation. Compression is lossless (RLE Lossless is encoded
by pydicom itself, JPEG 2000 Lossless by pylibjpeg-openjpeg; JPEG-LS would need pyjpegls, which
is not a project dependency, so no profile uses it).
"""

from __future__ import annotations

import logging
import os
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
)

log = logging.getLogger(__name__)

CR_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.1")
DX_IMAGE_STORAGE_FOR_PRESENTATION = UID("1.2.840.10008.5.1.4.1.1.1.1")
BASIC_TEXT_SR_STORAGE = UID("1.2.840.10008.5.1.4.1.1.88.11")
UNCOMPRESSED = frozenset({ExplicitVRLittleEndian, ImplicitVRLittleEndian})
COMPRESSED = frozenset({RLELossless, JPEG2000Lossless})
CORRUPT_KINDS = ("truncated", "non-image", "garbage")
FIELD_OF_VIEW_MM = 430.0  # a 43 cm detector: pixel spacing = FOV / matrix


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


# --------------------------------------------------------------------------- writing

_UID_NAMESPACE = uuid.UUID("6f1c1f0e-5b7a-5d4e-9a51-0fedc0ffee00")


def deterministic_uid(*parts: object) -> str:
    """A valid UID ``2.25.<uuid>`` from a name-based (SHA-1, version 5) UUID of ``parts``.

    pydicom's ``generate_uid(prefix=None)`` is random (it ignores entropy sources), which would
    break byte-identical output for a given seed.
    """
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, chr(31).join(str(p) for p in parts)).int}"


def site_response(display01: np.ndarray, profile: AcquisitionProfile, rng: np.random.Generator) -> np.ndarray:
    """The site's own rendering of the image: gamma (contrast), gain around mid-grey, noise."""
    x = np.clip(np.asarray(display01, dtype=np.float64), 0.0, 1.0) ** profile.contrast
    x = 0.5 + profile.gain * (x - 0.5)
    if profile.noise:
        x = x + rng.normal(0.0, profile.noise, size=x.shape)
    return np.clip(x, 0.0, 1.0)


def encode_pixels(display01: np.ndarray, profile: AcquisitionProfile) -> np.ndarray:
    """Display [0, 1] (bone bright) -> stored integers, inverting the presentation chain."""
    lo, hi = profile.stored_range
    frac = np.clip(display01, 0.0, 1.0)
    if profile.voi_lut_gamma is not None:
        frac = frac ** (1.0 / profile.voi_lut_gamma)  # the VOI LUT raises it back to the power gamma
    if profile.photometric == "MONOCHROME1":
        frac = 1.0 - frac
    stored = np.rint(lo + frac * (hi - lo))
    dtype = np.uint8 if profile.bits_stored <= 8 else np.uint16
    return stored.astype(dtype)


def rle_encode_frame(stored: np.ndarray) -> bytes:
    """One frame as DICOM RLE Lossless (PS3.5 Annex G): one PackBits segment per byte plane,
    most significant byte first, each row encoded on its own, segments padded to even length.

    pydicom's own RLE encoder is correct but pure Python (~0.2 s for a 320x320 16-bit frame);
    this one works on whole byte planes with numpy, so generation stays fast. pydicom decodes
    the result (the tests check it decodes to the same values).
    """
    arr = np.ascontiguousarray(stored)
    planes = [arr.astype(np.uint8)] if arr.dtype.itemsize == 1 else [(arr >> 8).astype(np.uint8), (arr & 0xFF).astype(np.uint8)]
    segments = [_packbits_plane(plane) for plane in planes]
    offsets = [64]
    for seg in segments[:-1]:
        offsets.append(offsets[-1] + len(seg))
    header = np.zeros(16, dtype="<u4")
    header[0] = len(segments)
    header[1 : 1 + len(segments)] = offsets
    return header.tobytes() + b"".join(segments)


def _packbits_plane(plane: np.ndarray) -> bytes:
    """PackBits a [rows, cols] byte plane, every row on its own, in whole-array numpy steps.

    Runs of >= 3 equal bytes become replicate packets (header 257 - n, one byte), everything else
    literal packets (header n - 1, n bytes); packets hold at most 128 bytes and never cross a row.
    """
    cols = plane.shape[1]
    flat = np.ascontiguousarray(plane).ravel()
    new_run = np.ones(flat.size, dtype=bool)
    new_run[1:] = flat[1:] != flat[:-1]
    new_run[::cols] = True
    starts = np.flatnonzero(new_run)
    lengths = np.diff(np.append(starts, flat.size))
    rep = lengths >= 3
    # literal blocks: maximal stretches of short runs inside one row
    block_start = ~rep & (np.concatenate(([True], rep[:-1])) | (starts % cols == 0))
    block_id = np.cumsum(block_start) - 1
    lit_starts = starts[block_start]
    lit_lengths = np.bincount(block_id[~rep], weights=lengths[~rep], minlength=lit_starts.size).astype(np.int64)
    rep_starts, rep_lengths = _chunks(starts[rep], lengths[rep])
    ones = np.flatnonzero(rep_lengths == 1)  # a replicate packet needs n >= 2: borrow one from the previous chunk
    rep_lengths[ones - 1] -= 1
    rep_lengths[ones] += 1
    rep_starts[ones] -= 1
    lit_starts, lit_lengths = _chunks(lit_starts, lit_lengths)

    pkt_start = np.concatenate((rep_starts, lit_starts))
    pkt_len = np.concatenate((rep_lengths, lit_lengths))
    is_rep = np.concatenate((np.ones(rep_starts.size, bool), np.zeros(lit_starts.size, bool)))
    order = np.argsort(pkt_start, kind="stable")
    pkt_start, pkt_len, is_rep = pkt_start[order], pkt_len[order], is_rep[order]
    size = 1 + np.where(is_rep, 1, pkt_len)
    pos = np.cumsum(size) - size
    out = np.zeros(int(size.sum()) + int(size.sum()) % 2, dtype=np.uint8)  # even length
    out[pos] = np.where(is_rep, 257 - pkt_len, pkt_len - 1).astype(np.uint8)
    out[pos[is_rep] + 1] = flat[pkt_start[is_rep]]
    lit_pos, lit_src, lit_len = pos[~is_rep] + 1, pkt_start[~is_rep], pkt_len[~is_rep]
    within = np.arange(int(lit_len.sum())) - np.repeat(np.cumsum(lit_len) - lit_len, lit_len)
    out[np.repeat(lit_pos, lit_len) + within] = flat[np.repeat(lit_src, lit_len) + within]
    return out.tobytes()


def _chunks(starts: np.ndarray, lengths: np.ndarray, limit: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """Split (start, length) stretches into pieces of at most ``limit``."""
    n_chunks = -(-lengths // limit)
    owner = np.repeat(np.arange(starts.size), n_chunks)
    within = np.arange(owner.size) - np.repeat(np.cumsum(n_chunks) - n_chunks, n_chunks)
    return starts[owner] + within * limit, np.minimum(limit, lengths[owner] - within * limit)


def _voi_lut_item(profile: AcquisitionProfile) -> Dataset:
    """VOI LUT Sequence item mapping every stored value to a 16-bit display value (PS3.3 C.11.2)."""
    lo, hi = profile.stored_range
    n = 2**profile.bits_stored
    frac = np.clip((np.arange(n, dtype=np.float64) - lo) / (hi - lo), 0.0, 1.0)
    if profile.photometric == "MONOCHROME1":  # output is inverted for display afterwards
        out = 1.0 - (1.0 - frac) ** profile.voi_lut_gamma
    else:
        out = frac**profile.voi_lut_gamma
    item = Dataset()
    item.add_new(0x00283002, "US", [n, 0, 16])  # LUT Descriptor: entries, first mapped value, bits
    item.LUTExplanation = f"gamma {profile.voi_lut_gamma}"
    item.add_new(0x00283006, "OW", np.rint(out * 65535).astype("<u2").tobytes())  # LUT Data
    return item


def write_radiograph(
    path: str | os.PathLike,
    display01: np.ndarray,
    profile: AcquisitionProfile,
    *,
    patient_id: str,
    patient_name: str,
    study_uid: str,
    view: str,
    seed: int,
    instance_number: int = 1,
    study_date: str = "20240101",
    institution: str = "",
) -> None:
    """Write ``display01`` (float [H, W] in [0, 1], bone bright) as a DICOM radiograph.

    A correct reader (modality LUT, VOI LUT/window, MONOCHROME1 inversion) returns
    ``site_response(display01)`` up to quantisation. Everything (noise, UIDs, whether the file has
    a File Meta header) is derived from ``seed`` and the identifiers: same inputs, same bytes.
    """
    image = np.asarray(display01)
    if image.ndim != 2:
        raise ProfileError(f"{path}: display image must be 2-D [H, W], got shape {image.shape}")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xD1C0]))
    stored = encode_pixels(site_response(image, profile, rng), profile)
    without_meta = bool(rng.random() < profile.no_file_meta_fraction)
    ds = _image_dataset(stored, profile, patient_id, patient_name, study_uid, view, seed, instance_number, study_date, institution)

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    if without_meta:
        del ds.file_meta
        ds.preamble = None
        pydicom.dcmwrite(target, ds, implicit_vr=True, little_endian=True, enforce_file_format=False)
        return
    if profile.transfer_syntax == RLELossless:
        ds.PixelData = encapsulate([rle_encode_frame(stored)])
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = RLELossless
    elif profile.compressed:
        ds.compress(profile.transfer_syntax, stored, generate_instance_uid=False)
    else:
        ds.file_meta.TransferSyntaxUID = UID(profile.transfer_syntax)
    pydicom.dcmwrite(target, ds, enforce_file_format=True)


def _image_dataset(
    stored: np.ndarray,
    profile: AcquisitionProfile,
    patient_id: str,
    patient_name: str,
    study_uid: str,
    view: str,
    seed: int,
    instance_number: int,
    study_date: str,
    institution: str,
) -> Dataset:
    dx = profile.modality == "DX"
    sop_class = DX_IMAGE_STORAGE_FOR_PRESENTATION if dx else CR_IMAGE_STORAGE
    sop_uid = deterministic_uid("sop", study_uid, patient_id, str(instance_number), str(seed))
    ds = Dataset()
    ds.file_meta = _file_meta(sop_class, sop_uid, ExplicitVRLittleEndian)
    ds.preamble = b"\x00" * 128
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = study_date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "090000"
    ds.AccessionNumber = ""
    ds.Modality = profile.modality
    ds.Manufacturer = profile.manufacturer
    ds.InstitutionName = institution
    ds.ReferringPhysicianName = ""
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = view
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = deterministic_uid("series", study_uid, profile.name)
    ds.StudyID = ""
    ds.SeriesNumber = 1
    ds.InstanceNumber = instance_number
    ds.PatientOrientation = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = profile.photometric
    ds.Rows, ds.Columns = (int(x) for x in stored.shape)
    ds.BitsAllocated = 8 if profile.bits_stored <= 8 else 16
    ds.BitsStored = profile.bits_stored
    ds.HighBit = profile.bits_stored - 1
    ds.PixelRepresentation = 0
    spacing = round(FIELD_OF_VIEW_MM / max(stored.shape), 4)
    ds.ImagerPixelSpacing = [spacing, spacing]
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    if dx:
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.PixelIntensityRelationship = "LOG"
        # -1: higher values = less X-ray intensity (bone bright as stored, MONOCHROME2)
        ds.PixelIntensityRelationshipSign = 1 if profile.photometric == "MONOCHROME1" else -1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "US"
        # MONOCHROME1 with INVERSE is one inversion, not two (PS3.3 C.8.11.3.1.7)
        ds.PresentationLUTShape = "INVERSE" if profile.photometric == "MONOCHROME1" else "IDENTITY"
        ds.DetectorType = "SCINTILLATOR"
    elif profile.rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = profile.rescale[0], profile.rescale[1]
        ds.RescaleType = "US"
    if profile.windows:
        centres = [c for c, _ in profile.windows]
        widths = [w for _, w in profile.windows]
        ds.WindowCenter = centres[0] if len(centres) == 1 else centres
        ds.WindowWidth = widths[0] if len(widths) == 1 else widths
        names = ["FULL", "SOFT", "DETAIL"][: len(centres)]
        ds.WindowCenterWidthExplanation = names[0] if len(names) == 1 else names
    if profile.voi_lut_gamma is not None:
        ds.VOILUTSequence = DicomSequence([_voi_lut_item(profile)])
    ds.PixelData = stored.tobytes()
    return ds


def _file_meta(sop_class: str, sop_uid: str, transfer_syntax: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = transfer_syntax
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "FEDXRAY_SIM"
    return meta


# --------------------------------------------------------------------------- corrupt files


def write_corrupt_file(path: str | os.PathLike, kind: str, *, template: str | os.PathLike, seed: int) -> None:
    """Write a file that a site reader must skip (with a reason), never crash on.

    ``truncated``: the first 60 % of a valid radiograph (``template``); ``garbage``: a DICOM
    preamble and magic followed by random bytes; ``non-image``: a valid Basic Text SR object
    (no Pixel Data) of the template's patient, as PACS exports often contain.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xBAD]))
    if kind == "truncated":
        data = Path(template).read_bytes()
        target.write_bytes(data[: int(len(data) * 0.6)])
    elif kind == "garbage":
        target.write_bytes(b"\x00" * 128 + b"DICM" + rng.bytes(int(rng.integers(2000, 6000))))
    elif kind == "non-image":
        source = pydicom.dcmread(template, stop_before_pixels=True, force=True)
        sop_uid = deterministic_uid("sr", str(seed))
        ds = Dataset()
        ds.file_meta = _file_meta(BASIC_TEXT_SR_STORAGE, sop_uid, ExplicitVRLittleEndian)
        ds.preamble = b"\x00" * 128
        ds.SOPClassUID = BASIC_TEXT_SR_STORAGE
        ds.SOPInstanceUID = sop_uid
        ds.Modality = "SR"
        for keyword in ("PatientID", "PatientName", "StudyInstanceUID", "StudyDate"):
            if keyword in source:
                setattr(ds, keyword, source.data_element(keyword).value)
        ds.SeriesInstanceUID = deterministic_uid("sr-series", str(seed))
        ds.ValueType = "CONTAINER"
        ds.CompletionFlag = "COMPLETE"
        ds.VerificationFlag = "UNVERIFIED"
        pydicom.dcmwrite(target, ds, enforce_file_format=True)
    else:
        raise ProfileError(f"unknown corrupt file kind {kind!r}; expected one of {', '.join(CORRUPT_KINDS)}")
