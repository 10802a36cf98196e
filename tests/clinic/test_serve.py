"""End to end: ``fl-predict serve`` as a real process between a sending modality and a receiving PACS.

The listener is started as a subprocess on loopback; the PACS is a pynetdicom storage SCP in the
test (and, where dcmtk is installed, dcmtk's storescp), the modality a pynetdicom C-STORE SCU
(and dcmtk's storescu). Every process started here is stopped here.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from conftest import chest
from pydicom.uid import (
    ComprehensiveSRStorage,
    ComputedRadiographyImageStorage,
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGLSLossless,
    RLELossless,
    SecondaryCaptureImageStorage,
)
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification

pytestmark = pytest.mark.e2e

FL_PREDICT = str(Path(sys.executable).parent / "fl-predict")
STORESCU, STORESCP = "/usr/bin/storescu", "/usr/bin/storescp"  # dcmtk's: pynetdicom installs scripts with the same names
REAL_FILES = ("pydicom_dicomdirtests_CR1_6154.dcm", "pydicomdata_RG1_J2KR.dcm", "pydicomdata_RG1_J2KI.dcm",
              "siim_1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm")
NOT_A_RADIOGRAPH = "pydicomdata_vlut_04.dcm"  # a Secondary Capture LUT test object (Modality OT)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Receiver:
    """A storage SCP standing in for the PACS: keeps every dataset it is sent."""

    def __init__(self) -> None:
        self.port = _free_port()
        self.received: list[pydicom.Dataset] = []
        self._lock = threading.Lock()
        ae = AE("PACS")
        for sop in (ComprehensiveSRStorage, SecondaryCaptureImageStorage):
            ae.add_supported_context(sop, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        self.server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)])

    def _store(self, event: evt.Event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        with self._lock:
            self.received.append(ds)
        return 0x0000

    def wait_for(self, sop_uids: set[str], timeout: float = 90.0) -> dict[str, list[pydicom.Dataset]]:
        """Source SOP Instance UID -> the results referencing it, once every UID has an SR and a heatmap."""
        deadline = time.monotonic() + timeout
        while True:
            found = _by_source(list(self.received))
            if all({"SR", "OT"} <= {d.Modality for d in found.get(uid, [])} for uid in sop_uids) or time.monotonic() > deadline:
                return found
            time.sleep(0.25)


def _by_source(datasets: list[pydicom.Dataset]) -> dict[str, list[pydicom.Dataset]]:
    out: dict[str, list[pydicom.Dataset]] = {}
    for ds in datasets:
        if ds.Modality == "SR":
            refs = [s.ReferencedSOPInstanceUID for series in ds.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
                    for s in series.ReferencedSOPSequence]
        else:
            refs = [ds.SourceImageSequence[0].ReferencedSOPInstanceUID]
        for uid in refs:
            out.setdefault(str(uid), []).append(ds)
    return out


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    rec = Receiver()
    try:
        yield rec
    finally:
        rec.server.shutdown()


class Listener:
    def __init__(self, proc: subprocess.Popen, port: int, log: Path, out: Path) -> None:
        self.proc, self.port, self.log, self.out = proc, port, log, out

    def echo(self) -> int | None:
        ae = AE("MODALITY")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", self.port, ae_title="FEDXRAY")
        if not assoc.is_established:
            return None
        try:
            status = assoc.send_c_echo()
            return int(status.Status) if status else None
        finally:
            assoc.release()


def _start_listener(model: Path, forward: str, tmp: Path) -> Listener:
    port = _free_port()
    log = tmp / "serve.log"
    out = tmp / "serve-out"
    with log.open("w") as fh:
        proc = subprocess.Popen([FL_PREDICT, "serve", "--model", str(model), "--port", str(port), "--calling-aet", "MODALITY",
                                 "--ae-title", "FEDXRAY", "--forward", forward, "--out", str(out), "--threads", "1"],
                                stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    listener = Listener(proc, port, log, out)
    deadline = time.monotonic() + 90
    while listener.echo() != 0x0000:
        if proc.poll() is not None or time.monotonic() > deadline:
            _stop(proc)
            pytest.fail(f"fl-predict serve did not answer C-ECHO (exit {proc.poll()}):\n{log.read_text()}")
        time.sleep(0.3)
    return listener


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


@pytest.fixture
def listener(scatter_model, receiver, tmp_path) -> Iterator[Listener]:
    running = _start_listener(scatter_model, f"127.0.0.1:{receiver.port}:PACS", tmp_path)
    try:
        yield running
    finally:
        _stop(running.proc)


def _compressed_copies(tmp_path: Path, dicom_writer) -> list[pydicom.Dataset]:
    """A synthetic CR in RLE Lossless and JPEG-LS Lossless (pydicom's encoders), and JPEG Lossless SV1 when dcmtk is there."""
    copies = []
    for i, syntax in enumerate((RLELossless, JPEGLSLossless)):
        ds = pydicom.dcmread(dicom_writer(tmp_path / f"c{i}.dcm", chest(seed=i), bits=12))
        ds.compress(syntax, generate_instance_uid=False)
        copies.append(ds)
    if shutil.which("dcmcjpeg", path="/usr/bin"):
        plain = dicom_writer(tmp_path / "c2.dcm", chest(seed=2), bits=12)
        subprocess.run(["dcmcjpeg", "+e1", str(plain), str(tmp_path / "c2.jpll.dcm")], check=True, capture_output=True, timeout=60)
        copies.append(pydicom.dcmread(tmp_path / "c2.jpll.dcm"))
    return copies


def _truncated(tmp_path: Path, dicom_writer) -> pydicom.Dataset:
    ds = pydicom.dcmread(dicom_writer(tmp_path / "t.dcm", chest(seed=5), bits=12))
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 3]  # the header promises more pixels than arrive
    return ds


def test_each_radiograph_comes_back_as_an_sr_and_a_heatmap(listener, receiver, dicom_dir, tmp_path, dicom_writer) -> None:
    images = [pydicom.dcmread(dicom_dir / name) for name in REAL_FILES] + _compressed_copies(tmp_path, dicom_writer)
    other = pydicom.dcmread(dicom_dir / NOT_A_RADIOGRAPH)
    broken = _truncated(tmp_path, dicom_writer)
    forged = _truncated(tmp_path, dicom_writer)
    forged.SOPInstanceUID = "1.2.3\nERROR clinic.serve: PACS unreachable"  # a log line of the sender's choosing
    scu = AE("MODALITY")
    for ds in [*images, other, broken]:
        scu.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    scu.add_requested_context(CTImageStorage)  # a class the listener does not take
    assoc = scu.associate("127.0.0.1", listener.port, ae_title="FEDXRAY")
    assert assoc.is_established
    try:
        refused = {c.abstract_syntax for c in assoc.rejected_contexts}
        assert CTImageStorage in refused and ComputedRadiographyImageStorage not in refused
        statuses = {ds.SOPInstanceUID: assoc.send_c_store(ds) for ds in images}
        bad_other, bad_pixels, bad_uid = assoc.send_c_store(other), assoc.send_c_store(broken), assoc.send_c_store(forged)
    finally:
        assoc.release()
    assert {uid: int(s.Status) for uid, s in statuses.items()} == {ds.SOPInstanceUID: 0 for ds in images}
    assert int(bad_other.Status) == 0xC000 and "not a radiograph" in bad_other.ErrorComment
    assert int(bad_pixels.Status) == 0xC000 and "unreadable" in bad_pixels.ErrorComment
    assert int(bad_uid.Status) == 0xA900 and "not a valid DICOM UID" in bad_uid.ErrorComment

    sent = {str(ds.SOPInstanceUID) for ds in images}
    # the 16 x 16 C-spine is outside the intended use: an SR that says so comes back, and no heatmap
    outside = {str(ds.SOPInstanceUID) for ds in images if ds.get("BodyPartExamined") == "CSPINE"}
    found = receiver.wait_for(sent - outside)  # scored in the order sent: the C-spine (first) is answered before them
    for uid in sent:
        kinds = {d.Modality: d for d in found.get(uid, [])}
        expected = {"SR"} if uid in outside else {"SR", "OT"}
        assert set(kinds) == expected, f"no SR and heatmap for {uid}: {listener.log.read_text()}"
        source = next(ds for ds in images if ds.SOPInstanceUID == uid)
        assert kinds["SR"].StudyInstanceUID == source.StudyInstanceUID == kinds.get("OT", kinds["SR"]).StudyInstanceUID
        assert (listener.out / f"{uid}.sr.dcm").is_file() and (listener.out / f"{uid}.heatmap.png").is_file() != (uid in outside)
    assert str(other.SOPInstanceUID) not in found and str(broken.SOPInstanceUID) not in found
    assert listener.echo() == 0x0000  # still serving after the refusals
    log = listener.log.read_text()
    assert log.count("-> 0xC000") == 2 and "refused SOP class(es) CT Image Storage" in log
    assert log.count("without TLS") == 1 and "listening on 127.0.0.1:" in log and "calling AE titles MODALITY" in log
    assert "1.2.3\\nERROR clinic.serve" in log and not any(line.startswith("ERROR clinic.serve: PACS") for line in log.splitlines())
    for ds in [*images, other, broken]:
        name = str(ds.get("PatientName", "") or "")
        assert not name or name not in log  # SOP Instance UIDs only, never a patient's name


@pytest.mark.skipif(not (Path(STORESCU).exists() and Path(STORESCP).exists()), reason="dcmtk storescu/storescp not installed")
def test_dcmtk_modality_and_pacs(scatter_model, tmp_path, dicom_writer) -> None:
    """dcmtk on both sides: an independent implementation sends, another one receives (synthetic CRs: no data needed)."""
    pacs_port, inbox = _free_port(), tmp_path / "pacs"
    inbox.mkdir()
    pacs = subprocess.Popen([STORESCP, "-aet", "PACS", "-od", str(inbox), "+xa", str(pacs_port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        listener = _start_listener(scatter_model, f"127.0.0.1:{pacs_port}:PACS", tmp_path)
        try:
            files = [dicom_writer(tmp_path / "send" / f"{i}.dcm", chest(seed=20 + i), bits=12) for i in range(2)]
            run = subprocess.run([STORESCU, "-aet", "MODALITY", "-aec", "FEDXRAY", "127.0.0.1", str(listener.port),
                                  *map(str, files)], capture_output=True, text=True, timeout=120)
            assert run.returncode == 0, run.stderr
            wanted = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
            deadline = time.monotonic() + 90
            while True:
                found = _by_source([pydicom.dcmread(p) for p in inbox.iterdir() if p.is_file()])
                if all(len(found.get(uid, [])) == 2 for uid in wanted) or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            for uid in wanted:
                assert sorted(d.Modality for d in found.get(uid, [])) == ["OT", "SR"], listener.log.read_text()
        finally:
            _stop(listener.proc)
    finally:
        _stop(pacs)


def test_forwarding_to_a_dead_pacs_keeps_the_files_and_says_so(scatter_model, tmp_path, dicom_writer) -> None:
    listener = _start_listener(scatter_model, f"127.0.0.1:{_free_port()}:NOBODY", tmp_path)
    try:
        ds = pydicom.dcmread(dicom_writer(tmp_path / "a.dcm", chest(), bits=12))
        scu = AE("MODALITY")
        scu.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
        assoc = scu.associate("127.0.0.1", listener.port, ae_title="FEDXRAY")
        assert int(assoc.send_c_store(ds).Status) == 0
        assoc.release()
        deadline = time.monotonic() + 60
        while "forwarding results" not in listener.log.read_text() and time.monotonic() < deadline:
            time.sleep(0.5)
        log = listener.log.read_text()
        assert f"forwarding results of {ds.SOPInstanceUID} to NOBODY@127.0.0.1" in log and "failed after 3 tries" in log
        assert (listener.out / f"{ds.SOPInstanceUID}.sr.dcm").is_file()
        assert listener.echo() == 0x0000  # still serving
    finally:
        _stop(listener.proc)


# --------------------------------------------------------------------------- in-process listener


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 / localhost (PEM files)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return cert_path, key_path


def test_tls_listener_and_drift_line(scatter_model, receiver, tmp_path, dicom_writer, caplog) -> None:
    """TLS on the listener (a plain association is refused), and the drift line logged every N images."""
    import logging
    import ssl

    from clinic.drift import REFERENCE_FILE, Observation, reference_from_observations
    from clinic.forward import Destination
    from clinic.model import Scorer
    from clinic.serve import Listener
    from clinic.serve_cli import server_tls
    from common.preprocess import to_model_input

    scorer = Scorer(scatter_model, threads=1)
    state = tmp_path / "state"
    state.mkdir()
    trusted = [Observation.of(to_model_input(chest(seed=i), 64), {"opacity": 0.3}) for i in range(20)]
    (state / REFERENCE_FILE).write_text(reference_from_observations(trusted, (64, 64), model_sha256=scorer.identity.sha256))
    cert, key = _self_signed(tmp_path)
    port = _free_port()
    node = Listener(scorer, ae_title="FEDXRAY", out=tmp_path / "out", state=state, server_tls=server_tls(str(cert), str(key), None),
                    forward=Destination.parse(f"127.0.0.1:{receiver.port}:PACS"), drift_every=2, calling_aets=["MODALITY"])
    caplog.set_level(logging.INFO, logger="clinic")
    node.start("127.0.0.1", port)
    try:
        scu = AE("MODALITY")
        scu.add_requested_context(ComputedRadiographyImageStorage, ExplicitVRLittleEndian)
        plain = scu.associate("127.0.0.1", port, ae_title="FEDXRAY")
        assert not plain.is_established  # no TLS handshake, no association
        client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cert))
        assoc = scu.associate("127.0.0.1", port, ae_title="FEDXRAY", tls_args=(client, "localhost"))
        assert assoc.is_established
        uids = set()
        for i in range(2):
            ds = pydicom.dcmread(dicom_writer(tmp_path / f"{i}.dcm", chest(seed=40 + i), bits=12))
            assert int(assoc.send_c_store(ds).Status) == 0
            uids.add(str(ds.SOPInstanceUID))
        assoc.release()
        found = receiver.wait_for(uids, timeout=60)
        assert all(len(found.get(uid, [])) == 2 for uid in uids)
        deadline = time.monotonic() + 20
        while not any("drift" in r.getMessage() for r in caplog.records) and time.monotonic() < deadline:
            time.sleep(0.2)
        drift = [r.getMessage() for r in caplog.records if r.getMessage().startswith("drift ")]
        assert drift and "collecting over 2 image(s)" in drift[0] and "brightness" in drift[0]
    finally:
        node.stop()
