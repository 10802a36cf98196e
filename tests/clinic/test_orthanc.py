"""A real PACS in the loop: Orthanc routes images to ``fl-predict serve``, which answers into the image's own study.

Orthanc (Debian package ``orthanc``) runs on loopback ports with its own storage folder under the
test's tmp dir; images are uploaded through its REST API and sent to ``serve`` by Orthanc itself
(C-STORE to the modality "fedxray"); ``serve`` forwards the SR and the heatmap Secondary Capture
back to Orthanc's DICOM port, and the test reads them from Orthanc's REST API: in the study of the
image they were made for. Both processes are started here and stopped by their PIDs.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import ComprehensiveSRStorage, SecondaryCaptureImageStorage
from serve_peer import free_port

ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
FL_PREDICT = str(Path(sys.executable).parent / "fl-predict")
ASSESSED = ("pydicomdata_RG1_J2KI.dcm", "siim_1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm")
NOT_ASSESSED = "pydicomdata_RG3_J2KI.dcm"  # a CR of a tibia: outside a chest model's intended use

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(not Path(ORTHANC).is_file(),
                                                  reason="Orthanc not installed (Debian package orthanc; .ci/run installs it)")]


@dataclass
class Pacs:
    http: int
    dicom: int
    log: Path
    serve_log: Path

    def call(self, method: str, path: str, body: bytes | dict | None = None) -> Any:
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        request = urllib.request.Request(f"http://127.0.0.1:{self.http}{path}", data=data, method=method)
        with urllib.request.urlopen(request, timeout=60) as response:
            payload = response.read()
        return json.loads(payload) if response.headers.get_content_type() == "application/json" else payload

    def logs(self) -> str:
        return f"--- Orthanc\n{self.log.read_text()[-3000:]}\n--- fl-predict serve\n{self.serve_log.read_text()[-3000:]}"


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the process group of ``proc`` (its PID), then SIGKILL if it has not ended in 30 s."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def _until(check, what: str, timeout: float, pacs: Pacs | None = None):
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = check()
        except (OSError, urllib.error.URLError):
            result = None
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"{what} within {timeout:.0f} s\n{pacs.logs() if pacs else ''}")
        time.sleep(0.25)


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory, scatter_model: Path) -> Iterator[Pacs]:
    root = tmp_path_factory.mktemp("orthanc")
    http, dicom, serve_port = free_port(), free_port(), free_port()
    config = {
        "Name": "fedxray-test", "StorageDirectory": str(root / "storage"), "IndexDirectory": str(root / "index"),
        "HttpPort": http, "DicomPort": dicom, "DicomAet": "ORTHANC", "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False, "DicomAlwaysAllowStore": True, "DicomCheckModalityHost": False,
        "DicomModalities": {"fedxray": ["FEDXRAY", "127.0.0.1", serve_port]}, "Plugins": [],
    }  # fmt: skip
    (root / "orthanc.json").write_text(json.dumps(config))
    result = Pacs(http, dicom, root / "orthanc.log", root / "serve.log")
    with result.log.open("w") as log:
        orthanc = subprocess.Popen([ORTHANC, str(root / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True, cwd=root)
    serve = None
    try:
        _until(lambda: result.call("GET", "/system"), "Orthanc did not answer", 30, result)
        with result.serve_log.open("w") as log:
            serve = subprocess.Popen([FL_PREDICT, "serve", "--model", str(scatter_model), "--port", str(serve_port),
                                      "--calling-aet", "ORTHANC", "--forward", f"127.0.0.1:{dicom}:ORTHANC",
                                      "--out", str(root / "results"), "--threads", "1"],
                                     stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                     env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
        _until(lambda: serve.poll() is None and result.call("POST", "/modalities/fedxray/echo", {}) is not None,
               "fl-predict serve did not answer Orthanc's C-ECHO", 90, result)
        yield result
    finally:
        if serve is not None:
            _stop(serve)
        _stop(orthanc)


def _texts(ds: pydicom.Dataset) -> Iterator[str]:
    """Every TextValue and CodeMeaning in an SR's content tree."""
    for item in ds.get("ContentSequence", []):
        yield str(item.get("TextValue", ""))
        for concept in ("ConceptNameCodeSequence", "ConceptCodeSequence"):
            for code in item.get(concept, []):
                yield str(code.get("CodeMeaning", ""))
        yield from _texts(item)


@pytest.mark.parametrize(("name", "assessed"), [
    *(pytest.param(name, True, id=kind) for name, kind in zip(ASSESSED, ("cr-chest", "siim-sc"), strict=True)),
    pytest.param(NOT_ASSESSED, False, id="tibia"),
])  # fmt: skip
def test_results_come_back_into_the_images_own_study(pacs: Pacs, dicom_dir: Path, name: str, assessed: bool) -> None:
    source = pydicom.dcmread(dicom_dir / name, stop_before_pixels=True)
    uploaded = pacs.call("POST", "/instances", (dicom_dir / name).read_bytes())["ID"]
    study = pacs.call("GET", f"/instances/{uploaded}/study")["ID"]
    sent = pacs.call("POST", "/modalities/fedxray/store", {"Resources": [uploaded], "Synchronous": True})
    assert sent["InstancesCount"] == 1 and sent["FailedInstancesCount"] == 0, pacs.logs()

    def results() -> list[pydicom.Dataset]:
        ids = [i["ID"] for i in pacs.call("GET", f"/studies/{study}/instances") if i["ID"] != uploaded]
        return [pydicom.dcmread(io.BytesIO(pacs.call("GET", f"/instances/{i}/file"))) for i in ids]

    found = _until(lambda: [ds for ds in results() if ds.Modality == "SR"], f"no SR in the study of {name}", 60, pacs)
    time.sleep(1.0)  # the heatmap follows the SR in the same association, if there is one
    found = results()
    by_class = {str(ds.SOPClassUID): ds for ds in found}
    sr = by_class[ComprehensiveSRStorage]
    assert sr.StudyInstanceUID == source.StudyInstanceUID and sr.PatientID == source.PatientID
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0]
    assert evidence.StudyInstanceUID == source.StudyInstanceUID
    assert evidence.ReferencedSeriesSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    texts = " ".join(_texts(sr)).lower()
    if assessed:
        assert len(found) == 2 and "not assessed" not in texts, pacs.logs()
        capture = by_class[SecondaryCaptureImageStorage]
        assert capture.StudyInstanceUID == source.StudyInstanceUID and capture.PatientID == source.PatientID
        assert capture.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    else:  # the intended-use gate: an SR that says the image was not assessed and why, and no heatmap
        assert len(found) == 1 and SecondaryCaptureImageStorage not in by_class
        assert "not assessed" in texts
