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
by pylibjpeg-rle, JPEG 2000 Lossless by pylibjpeg-openjpeg, both through pydicom's
``Dataset.compress``; JPEG-LS would need pyjpegls, which is not a project dependency, so no profile
uses it). The profiles themselves are in simulations/acquisition_profiles.py.
"""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian, RLELossless

from simulations.acquisition_profiles import (  # noqa: F401 - re-exported: callers import the profiles from here
    COMPRESSED,
    UNCOMPRESSED,
    AcquisitionProfile,
    ProfileError,
    site_profiles,
)

log = logging.getLogger(__name__)

CR_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.1")
DX_IMAGE_STORAGE_FOR_PRESENTATION = UID("1.2.840.10008.5.1.4.1.1.1.1")
BASIC_TEXT_SR_STORAGE = UID("1.2.840.10008.5.1.4.1.1.88.11")
CORRUPT_KINDS = ("truncated", "non-image", "garbage")
FIELD_OF_VIEW_MM = 430.0  # a 43 cm detector: pixel spacing = FOV / matrix
#: pydicom's encoder plugin per compressed syntax: its own RLE encoder is pure Python (about 0.2 s for a
#: 320x320 16-bit frame); pylibjpeg-rle's takes a few milliseconds. JPEG 2000 uses the one available.
_ENCODER: dict[str, dict[str, str]] = {RLELossless: {"encoding_plugin": "pylibjpeg"}}


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
    if profile.compressed:
        ds.compress(profile.transfer_syntax, stored, generate_instance_uid=False, **_ENCODER.get(profile.transfer_syntax, {}))
    else:
        ds.file_meta.TransferSyntaxUID = UID(profile.transfer_syntax)
    pydicom.dcmwrite(target, ds, enforce_file_format=True)


def _image_dataset(stored: np.ndarray, profile: AcquisitionProfile, patient_id: str, patient_name: str, study_uid: str,
                   view: str, seed: int, instance_number: int, study_date: str, institution: str) -> Dataset:
    """The radiograph's dataset with native (uncompressed) Pixel Data; ``write_radiograph`` encodes and writes it."""
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
