"""Fixtures for the clinic tests: small real ONNX models and DICOM files that carry patient data.

Models are exported with the project's own exporter (common.onnx_export), so the clinic is
tested on the graphs a federation really produces; the ScatterNet export takes about 2 s and is
shared by the whole session.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from common.models import build_model
from common.onnx_export import export_onnx

# Patient data planted in test DICOM files: none of it may appear on stdout, stderr or in logs.
SECRETS = {
    "PatientName": "Secretname^Jane",
    "PatientID": "PID-SECRET-4711",
    "PatientBirthDate": "19450317",
    "AccessionNumber": "ACC-SECRET-99",
    "ReferringPhysicianName": "Drsecret",  # one component: highdicom warns about it, quoting the value
}
EPSILON = {"site-a": 2.5, "site-b": 3.25}


def export_scatternet(path: Path, *, weight: Callable[[torch.Tensor], None] | None = None, labels: tuple[str, ...] = ("opacity",),
                      task: str = "binary", threshold: float = 0.5, seed: int = 0) -> Path:
    """A ScatterNet (64 px, linear head) with seeded random head weights, or ``weight(tensor)`` applied."""
    torch.manual_seed(seed)
    model = build_model("scatternet", num_outputs=len(labels))
    with torch.no_grad():
        if weight is None:
            model.head.classifier.weight.normal_(0.0, 0.01)
        else:
            weight(model.head.classifier.weight)
    export_onnx(model, path, task=task, labels=list(labels), input_size=(64, 64), threshold=threshold,
                metadata={"model": "scatternet", "rounds": "3", "sites": json.dumps(sorted(EPSILON)), "epsilon": json.dumps(EPSILON)})
    return path


@pytest.fixture(scope="session")
def scatter_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A binary ScatterNet model ("opacity", threshold 0.5) with random head weights."""
    return export_scatternet(tmp_path_factory.mktemp("models") / "model.onnx")


def chest(rows: int = 96, cols: int = 80, seed: int = 0) -> np.ndarray:
    """A crude display image: dark lungs in a bright body, some noise (float32 in [0, 1])."""
    rng = np.random.default_rng(seed)
    v, u = np.mgrid[-1 : 1 : rows * 1j, -1 : 1 : cols * 1j]
    img = 0.7 - 0.35 * ((np.abs(np.abs(u) - 0.45) < 0.3) & (np.abs(v) < 0.6)) + rng.normal(0, 0.02, (rows, cols))
    return np.clip(img, 0, 1).astype(np.float32)


@pytest.fixture
def patient_dicom(tmp_path: Path, dicom_writer) -> Path:
    """A small CR file carrying the planted patient data of :data:`SECRETS`."""
    import pydicom

    path = dicom_writer(tmp_path / "in" / "patient.dcm", chest(), patient_id=SECRETS["PatientID"], bits=12)
    ds = pydicom.dcmread(path)
    ds.PatientName = SECRETS["PatientName"]
    ds.PatientBirthDate = SECRETS["PatientBirthDate"]
    ds.AccessionNumber = SECRETS["AccessionNumber"]
    ds.ReferringPhysicianName = SECRETS["ReferringPhysicianName"]
    ds.InstanceNumber = 3
    ds.save_as(path, enforce_file_format=True)
    return path
