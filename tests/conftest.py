"""Shared fixtures: where the real data lives, and a skip when it is absent.

Real data (../shared/data) is read-only and never committed; tests find it through the
FEDXRAY_DATA environment variable and skip cleanly without it, so the suite also passes on a
fresh clone elsewhere.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# OpenMP threads that spin-wait make torch steps 5-20x slower when the 2 cores are shared
# (tests, Ray actors, a SuperLink): yield the core instead. Set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")


@pytest.fixture(scope="module")
def one_torch_thread():
    """Run a module's tests on one intra-op thread, then restore the setting.

    On the 2 shared cores of CI/dev machines a 2-thread OpenMP pool waits for a thread that
    another process holds: a DenseNet DP step took 34 s instead of 5 s.
    """
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _data_root() -> Path | None:
    value = os.environ.get("FEDXRAY_DATA")
    if not value:
        return None
    root = Path(value).expanduser().resolve()
    return root if root.is_dir() else None


@pytest.fixture(scope="session")
def fedxray_data() -> Path:
    """Root of the shared real data; skips the test when FEDXRAY_DATA is unset or missing."""
    root = _data_root()
    if root is None:
        pytest.skip("FEDXRAY_DATA is not set (or missing): real-data test skipped")
    return root


@pytest.fixture(scope="session")
def dicom_dir(fedxray_data: Path) -> Path:
    """Folder of real DICOM radiographs and LUT test objects."""
    path = fedxray_data / "dicom"
    if not path.is_dir():
        pytest.skip(f"{path} not found: real-DICOM test skipped")
    return path


def write_test_dicom(
    path: Path,
    pixels,
    *,
    patient_id: str = "TEST-0001",
    study_uid: str | None = None,
    photometric: str = "MONOCHROME2",
    bits: int = 8,
    modality: str = "CR",
) -> Path:
    """Write a small uncompressed DICOM radiograph (tests only).

    ``pixels`` are display values in [0, 1] (1 brightest); MONOCHROME1 files store them inverted,
    as a real MONOCHROME1 modality would, so a correct reader gives ``pixels`` back.
    """
    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    arr = np.asarray(pixels, dtype=np.float64)
    top = (1 << bits) - 1
    stored = arr if photometric == "MONOCHROME2" else 1.0 - arr
    values = np.rint(stored * top).astype(np.uint8 if bits <= 8 else np.uint16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientID = patient_id
    ds.PatientName = "Test^Patient"
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = modality
    ds.ViewPosition = "PA"
    ds.Rows, ds.Columns = values.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 8 if bits <= 8 else 16
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    ds.PixelData = values.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture
def dicom_writer():
    """The test DICOM writer as a fixture, for tests that build small sites in tmp dirs."""
    return write_test_dicom
