"""``fl-predict serve`` against a hostile DICOM peer: paths from UIDs, forged log lines, open defaults, the spool.

The listener runs in this process on a loopback port and a pynetdicom modality sends to it over
a real association; each test names what an attacker sent and what must (not) happen.
"""

from __future__ import annotations

import copy
import logging
import os
import stat
import time
from pathlib import Path

import pydicom
import pytest
from conftest import chest
from pydicom.uid import SecondaryCaptureImageStorage
from serve_peer import associate, running, store

from clinic.cli import _parsers
from clinic.model import Scorer
from clinic.outputs import build_outputs
from clinic.predict import read_source

# The modules this work added are imported inside the tests that need them: the tests of behaviour
# run (and fail) on the code before it too.

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def scorer(scatter_model) -> Scorer:
    return Scorer(scatter_model, threads=1)


def _image(tmp_path: Path, dicom_writer, name: str = "a.dcm", seed: int = 0) -> pydicom.Dataset:
    return pydicom.dcmread(dicom_writer(tmp_path / "send" / name, chest(seed=seed), bits=12))


def _files_outside(tmp_path: Path, out: Path) -> list[Path]:
    return [p for p in tmp_path.rglob("*") if p.is_file() and out not in p.parents and p.parent.name != "send"]


def _wait_for(path: Path, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    return path.exists()


def test_a_sop_instance_uid_that_is_not_a_uid_is_refused_and_names_no_file(scorer, tmp_path, dicom_writer) -> None:
    """Issue item 2: ``../escaped``, an absolute path and ``1.2.3/../../x`` wrote results outside --out."""
    out = tmp_path / "out"
    absolute = Path(f"/tmp/fedxray-{os.getpid()}")  # short: a UID has at most 64 characters, so has a C-STORE request's
    hostile = ["../escaped", str(absolute), "1.2.3/../../x", "1.2.03", "1.2.3.4a", "1..2"]
    escaped = lambda: [*_files_outside(tmp_path, out), *absolute.parent.glob(f"{absolute.name}*")]  # noqa: E731
    with running(scorer, out) as node:
        for i, uid in enumerate(hostile):
            ds = _image(tmp_path, dicom_writer, f"h{i}.dcm", seed=i)
            ds.SOPInstanceUID = uid
            status = store(node.port, ds)
            assert int(status.Status) == 0xA900 and "not a valid DICOM UID" in status.ErrorComment, uid
        good = _image(tmp_path, dicom_writer, "good.dcm", seed=9)
        assert int(store(node.port, good).Status) == 0x0000
        assert _wait_for(out / f"{good.SOPInstanceUID}.sr.dcm")
    written_outside = escaped()
    for path in written_outside:
        path.unlink()
    assert written_outside == []
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == sorted(
        f"{good.SOPInstanceUID}.{suffix}" for suffix in ("sr.dcm", "heatmap.png", "heatmap.dcm"))


def test_study_and_series_uids_must_be_valid_too(scorer, tmp_path, dicom_writer) -> None:
    """A multi-valued or path-like Study Instance UID cannot say which study the results join."""
    with running(scorer, tmp_path / "out") as node:
        ds = _image(tmp_path, dicom_writer)
        ds.StudyInstanceUID = ["1.2.3", "4.5.6"]
        status = store(node.port, ds)
        assert int(status.Status) == 0xA900 and "StudyInstanceUID" in status.ErrorComment
        ds = _image(tmp_path, dicom_writer, "b.dcm", seed=1)
        ds.SeriesInstanceUID = "../series"
        assert int(store(node.port, ds).Status) == 0xA900


def test_a_newline_in_a_received_value_forges_no_log_line(scorer, tmp_path, dicom_writer, caplog) -> None:
    """Issue item 10: a UID with a newline started a line of the attacker's choosing in the service's log."""
    caplog.set_level(logging.INFO, logger="clinic")
    forged = "1.2.3\nERROR clinic.serve: PACS unreachable"  # at most 64 characters, as a C-STORE request carries
    with running(scorer, tmp_path / "out") as node:
        ds = _image(tmp_path, dicom_writer)
        ds.SOPInstanceUID = forged
        assert int(store(node.port, ds).Status) == 0xA900
        capture = _image(tmp_path, dicom_writer, "b.dcm", seed=1)  # a Secondary Capture whose Modality is 5000 characters
        capture.SOPClassUID = capture.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
        capture.Modality = "OT\n" + "X" * 5000
        assert int(store(node.port, capture).Status) == 0xC000
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("clinic")]  # pydicom's: test_serve.py, whole log
    assert any("1.2.3\\nERROR" in m for m in messages)  # said, escaped, on one line
    assert all("\n" not in m and "\r" not in m and len(m) < 1000 for m in messages)


def test_one_line_records_escape_what_reaches_a_handler() -> None:
    from clinic.log_values import OneLineRecords, loggable

    record = logging.LogRecord("pynetdicom", logging.ERROR, __file__, 1, "calling AE %s", ("A\r\nB",), None)
    assert OneLineRecords().filter(record) and record.getMessage() == "calling AE A\\r\\nB"
    assert loggable("x" * 100, 10) == "x" * 10 + "..." and loggable(None) == ""


def test_received_images_wait_in_a_private_folder(scorer, tmp_path, dicom_writer) -> None:
    """Issue item 10: the spool held full DICOMs (patient data) as 0644 files in a 0755 folder."""
    out = tmp_path / "out"
    (out / ".incoming").mkdir(parents=True)
    (out / ".incoming").chmod(0o755)  # as an earlier version left it
    old_umask = os.umask(0o022)
    try:
        with running(scorer, out, idle_worker=True) as node:  # nothing is scored: the image stays spooled
            assert int(store(node.port, _image(tmp_path, dicom_writer)).Status) == 0x0000
            spooled = list((out / ".incoming").glob("*.dcm"))
            assert stat.S_IMODE((out / ".incoming").stat().st_mode) == 0o700
            assert len(spooled) == 1 and stat.S_IMODE(spooled[0].stat().st_mode) == 0o600
    finally:
        os.umask(old_umask)


def test_serve_needs_calling_aet_and_binds_loopback(capsys) -> None:
    """Issue item 4: serve bound 0.0.0.0 and took associations from any AE title by default."""
    parser = _parsers()["serve"]
    base = ["--model", "m.onnx", "--port", "11112"]
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(base)
    assert exc.value.code == 2 and "--calling-aet" in capsys.readouterr().err
    assert parser.parse_args([*base, "--calling-aet", "PACS"]).host == "127.0.0.1"
    assert parser.parse_args([*base, "--any-calling-aet"]).any_calling_aet
    with pytest.raises(SystemExit):
        parser.parse_args([*base, "--any-calling-aet", "--calling-aet", "PACS"])


def test_only_the_allowed_calling_aet_may_associate(scorer, tmp_path) -> None:
    with running(scorer, tmp_path / "out", calling_aets=["PACS"]) as node:
        intruder = associate(node.port, calling="INTRUDER")
        assert intruder.is_rejected and not intruder.is_established
        pacs = associate(node.port, calling="PACS")
        assert pacs.is_established
        pacs.release()


def test_plain_dicom_is_warned_about_once_per_direction() -> None:
    import ssl

    from clinic.forward import Destination
    from clinic.serve_cli import plain_dicom_warning

    dest, ctx = Destination.parse("127.0.0.1:104:PACS"), ssl.create_default_context()
    assert "receiving without TLS" in plain_dicom_warning(None, None, None)
    assert "receiving and forwarding without TLS" in plain_dicom_warning(None, None, dest)
    assert "DICOM forwarding without TLS" in plain_dicom_warning(ctx, None, dest)
    assert plain_dicom_warning(ctx, ctx, dest) is None and plain_dicom_warning(ctx, None, None) is None


def test_results_stay_in_the_study_and_patient_of_their_image(scorer, patient_dicom) -> None:
    """Issue item 4: whatever built them, results that would join another study or patient are caught."""
    from clinic.study_guard import foreign_references

    source = read_source(patient_dicom)
    outputs = build_outputs(source, scorer.score(source.pixels), scorer)
    results = outputs.datasets()
    assert len(results) == 2 and foreign_references(source.header, results) == []
    sr, sc = (copy.deepcopy(ds) for ds in results)
    sr.StudyInstanceUID = "1.2.3.999"
    assert foreign_references(source.header, [sr, sc]) == ["SR result: Study Instance UID is not the source image's"]
    sr, sc = (copy.deepcopy(ds) for ds in results)
    sc.PatientID = "SOMEONE-ELSE"
    sc.SourceImageSequence[0].ReferencedSOPInstanceUID = "1.2.3.4"
    assert foreign_references(source.header, [sr, sc]) == [
        "OT result: Patient ID is not the source image's", "OT result: references an instance other than the source image"]
    evidence = copy.deepcopy(results[0])
    evidence.CurrentRequestedProcedureEvidenceSequence[0].StudyInstanceUID = "1.2.3.999"
    assert foreign_references(source.header, [evidence]) == ["SR result: references another study"]
