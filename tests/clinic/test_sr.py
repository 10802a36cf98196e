"""Tests for clinic.sr and clinic.secondary_capture: DICOM a PACS and a viewer accept, referencing the source."""

from __future__ import annotations

import shutil
import subprocess

import highdicom as hd
import numpy as np
import pydicom
import pytest
from conftest import SECRETS, export_scatternet
from pydicom.sr.codedict import codes
from pydicom.uid import ComprehensiveSRStorage, SecondaryCaptureImageStorage

from clinic.model import Scorer
from clinic.outputs import build_outputs, dicom_bytes, write_outputs
from clinic.predict import read_source
from clinic.secondary_capture import SC_SERIES_NUMBER
from clinic.sr import DECISION_SUPPORT, LOCAL_SCHEME, ReportError, build_sr, finding_code


@pytest.fixture(scope="module")
def scorer(scatter_model) -> Scorer:
    return Scorer(scatter_model)


@pytest.fixture
def result(scorer, patient_dicom):
    source = read_source(patient_dicom)
    scored = scorer.score(source.pixels)
    return source, scored, build_outputs(source, scored, scorer)


def _items(ds, found=None):
    """Every content item of an SR tree, depth first."""
    found = [] if found is None else found
    for item in ds.get("ContentSequence", []):
        found.append(item)
        _items(item, found)
    return found


def _text(item) -> str:
    return str(item.ConceptNameCodeSequence[0].CodeMeaning)


class TestStructuredReport:
    def test_references_the_source_and_carries_the_result(self, result, scorer) -> None:
        source, scored, outputs = result
        sr = outputs.sr
        header = source.header
        assert sr.SOPClassUID == ComprehensiveSRStorage and sr.Modality == "SR"
        assert sr.StudyInstanceUID == header.StudyInstanceUID
        assert sr.PatientID == SECRETS["PatientID"]  # copied from the source, as the SR IOD requires (it stays in the hospital)
        assert sr.VerificationFlag == "UNVERIFIED" and sr.CompletionFlag == "COMPLETE"
        evidence = sr.CurrentRequestedProcedureEvidenceSequence[0]
        assert evidence.StudyInstanceUID == header.StudyInstanceUID
        series = evidence.ReferencedSeriesSequence[0]
        assert series.SeriesInstanceUID == header.SeriesInstanceUID
        assert series.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == header.SOPInstanceUID
        items = _items(sr)
        images = [i for i in items if i.ValueType == "IMAGE"]
        assert images and all(i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == header.SOPInstanceUID for i in images)
        nums = {_text(i): float(i.MeasuredValueSequence[0].NumericValue) for i in items if i.ValueType == "NUM"}
        assert nums["Probability"] == pytest.approx(scored.probabilities["opacity"], abs=1e-6)
        assert nums["Threshold Value"] == 0.5
        texts = {_text(i): [] for i in items if i.ValueType == "TEXT"}
        for i in items:
            if i.ValueType == "TEXT":
                texts[_text(i)].append(str(i.TextValue))
        params = texts["Algorithm Parameters"]
        assert "rounds=3" in params and any(p.startswith("epsilon=") and '"site-b": 3.25' in p for p in params)
        assert texts["Algorithm Name"] == ["fedxray scatternet"]
        assert scorer.identity.sha256[:12] in texts["Algorithm Version"][0]
        assert texts["Comment"][0].startswith(DECISION_SUPPORT)
        evaluation = [i for i in items if i.ValueType == "CODE" and _text(i) == "Opacity"]
        expected = codes.SCT.Present if "opacity" in scored.positive else codes.SCT.Absent
        assert evaluation[0].ConceptCodeSequence[0].CodeValue == expected.value

    def test_highdicom_reads_it_back_as_a_measurement_report(self, result) -> None:
        sr = pydicom.dcmread(pydicom.filebase.DicomBytesIO(dicom_bytes(result[2].sr)))
        parsed = hd.sr.srread(pydicom.filebase.DicomBytesIO(dicom_bytes(result[2].sr)))
        groups = parsed.content.get_image_measurement_groups()
        assert len(groups) == 1 and groups[0].finding_type.value == "112001"
        assert sr.SeriesNumber == 9901

    def test_uids_are_derived_from_source_and_model(self, result, scorer, tmp_path) -> None:
        source, scored, outputs = result
        again = build_sr(source.header, scored, scorer.identity, heatmap_method="linear-head")
        assert again.SOPInstanceUID == outputs.sr.SOPInstanceUID  # a resend replaces, not duplicates
        other = Scorer(export_scatternet(tmp_path / "other.onnx", seed=7), heatmaps=False)
        assert build_sr(source.header, scored, other.identity, heatmap_method=None).SOPInstanceUID != outputs.sr.SOPInstanceUID

    def test_a_source_without_uids_cannot_be_referenced(self, result, scorer) -> None:
        source, scored, _ = result
        header = source.header.copy()
        del header.SOPInstanceUID
        with pytest.raises(ReportError, match="SOPInstanceUID"):
            build_sr(header, scored, scorer.identity, heatmap_method=None)

    def test_finding_codes(self) -> None:
        assert (finding_code("PNEUMONIA").value, finding_code("PNEUMONIA").scheme_designator) == ("233604007", "SCT")
        assert finding_code("Pleural Effusion").value == "60046008"
        local = finding_code("funny finding")
        assert local.scheme_designator == LOCAL_SCHEME and local.meaning == "funny finding"

    @pytest.mark.skipif(shutil.which("dsrdump") is None, reason="dcmtk's dsrdump not installed (apt-get install dcmtk)")
    def test_dcmtk_reads_it_without_errors(self, result, tmp_path) -> None:
        written = write_outputs(result[2], tmp_path)
        run = subprocess.run(["dsrdump", written["sr"]], capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stderr
        assert "Error" not in run.stderr and "Warning" not in run.stderr, run.stderr
        assert "Imaging Measurement Report" in run.stdout and "Probability" in run.stdout and "Decision support" in run.stdout


class TestSecondaryCapture:
    def test_heatmap_image_sits_in_the_source_study(self, result) -> None:
        source, _, outputs = result
        sc = outputs.secondary_capture
        header = source.header
        assert sc.SOPClassUID == SecondaryCaptureImageStorage and sc.SeriesNumber == SC_SERIES_NUMBER
        assert sc.StudyInstanceUID == header.StudyInstanceUID and sc.SeriesInstanceUID != header.SeriesInstanceUID
        assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == header.SOPInstanceUID
        assert sc.PhotometricInterpretation == "RGB" and sc.BurnedInAnnotation == "YES"
        pixels = pydicom.dcmread(pydicom.filebase.DicomBytesIO(dicom_bytes(sc))).pixel_array
        np.testing.assert_array_equal(pixels, outputs.overlay)
        assert "fedxray" in sc.SeriesDescription and "not a diagnosis" in sc.DerivationDescription

    @pytest.mark.skipif(shutil.which("dcmdump") is None, reason="dcmtk's dcmdump not installed")
    def test_dcmtk_parses_it(self, result, tmp_path) -> None:
        written = write_outputs(result[2], tmp_path)
        run = subprocess.run(["dcmdump", "-q", "+E", written["heatmap_dcm"]], capture_output=True, text=True, timeout=60)
        assert run.returncode == 0 and "Secondary Capture" not in run.stderr, run.stderr


def test_files_are_named_for_the_source_instance(result, tmp_path) -> None:
    source, _, outputs = result
    written = write_outputs(outputs, tmp_path)
    uid = source.header.SOPInstanceUID
    png = str(tmp_path / f"{uid}.heatmap.png")
    assert written == {"sr": str(tmp_path / f"{uid}.sr.dcm"), "heatmap_png": png,
                       "heatmap_dcm": str(tmp_path / f"{uid}.heatmap.dcm"), "heatmaps": {outputs.label: png}}
    assert pydicom.dcmread(written["sr"]).Modality == "SR"


def test_simulated_hospital_radiographs_get_a_valid_sr(scorer, tmp_path) -> None:
    """CR with Imager Pixel Spacing and an empty Patient Orientation (type 2), as the acquisition profiles write them."""
    from simulations.acquisition import site_profiles, write_radiograph

    profile = site_profiles(1, seed=0)[0]  # CR, MONOCHROME1, JPEG 2000
    path = tmp_path / "cr.dcm"
    write_radiograph(path, np.clip(np.random.default_rng(0).random((64, 64)), 0, 1), profile, patient_id="P1",
                     patient_name="SIM^ONE", study_uid="1.2.826.0.1.3680043.10.77", view="PA", seed=1)
    source = read_source(path)
    assert source.header.PatientOrientation == "" and "ImagerPixelSpacing" in source.header
    outputs = build_outputs(source, scorer.score(source.pixels), scorer)
    assert outputs.problems == [] and outputs.sr is not None and outputs.secondary_capture is not None
    if shutil.which("dsrdump"):
        written = write_outputs(outputs, tmp_path / "out")
        run = subprocess.run(["dsrdump", written["sr"]], capture_output=True, text=True, timeout=60)
        assert run.returncode == 0 and not run.stderr.strip(), run.stderr


def test_multilabel_sr_lists_every_finding_at_its_own_threshold(patient_dicom, tmp_path) -> None:
    """A multilabel model's fedxray.thresholds decide each finding; the SR has one group per finding with its threshold."""
    import json

    import torch

    from common.models import build_model
    from common.onnx_export import export_onnx

    labels, thresholds = ["Effusion", "Infiltration", "Atelectasis"], {"Effusion": 0.0, "Infiltration": 1.0}
    torch.manual_seed(0)
    export_onnx(build_model("scatternet", num_outputs=3), tmp_path / "ml.onnx", task="multilabel", labels=labels,
                input_size=(64, 64), threshold=0.5,
                metadata={"model": "scatternet", "rounds": "1", "sites": "[]", "epsilon": "{}",
                          "thresholds": json.dumps(thresholds)})
    scorer = Scorer(tmp_path / "ml.onnx", heatmaps=False)
    assert scorer.identity.label_thresholds == {"Effusion": 0.0, "Infiltration": 1.0, "Atelectasis": 0.5}
    source = read_source(patient_dicom)
    scored = scorer.score(source.pixels)
    assert list(scored.probabilities) == labels
    assert "Effusion" in scored.positive and "Infiltration" not in scored.positive  # p >= 0 always, p >= 1 never
    sr = build_outputs(source, scored, scorer).sr
    nums = [(_text(i), float(i.MeasuredValueSequence[0].NumericValue)) for i in _items(sr) if i.ValueType == "NUM"]
    assert [v for name, v in nums if name == "Threshold Value"] == [0.0, 1.0, 0.5]
    assert len([name for name, _ in nums if name == "Probability"]) == 3
