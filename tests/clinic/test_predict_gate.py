"""fl-predict behind the intended-use gate: not-assessed answers (JSON, SR, no heatmap), --no-gate, old models,
and DICOM objects a validator (dciodvfy) and dcmtk's dsrdump accept."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import torch

from clinic.cli import main
from clinic.model import Scorer
from clinic.outputs import build_outputs
from clinic.predict import read_source
from common.models import build_model
from common.onnx_export import export_onnx, load_onnx_model
from common.ood import GateReference, OodScore, descriptor_for
from common.preprocess import to_model_input
from tests.clinic.conftest import EPSILON, chest

DCIODVFY = shutil.which("dciodvfy")
DSRDUMP = "/usr/bin/dsrdump" if Path("/usr/bin/dsrdump").is_file() else None


def export_gated(path: Path, cutoff: float) -> Path:
    """A ScatterNet with the image check: reference from phantom chests, the given cut-off."""
    torch.manual_seed(0)
    model = build_model("scatternet", num_outputs=1)
    with torch.no_grad():
        model.head.classifier.weight.normal_(0.0, 0.01)
    descriptor = descriptor_for(model)
    images = torch.from_numpy(np.stack([to_model_input(chest(seed=s), (64, 64))[0] for s in range(4)]))
    with torch.no_grad():
        u = descriptor(images).double().numpy()
    mean = u.mean(axis=0)
    reference = GateReference(mean.tolist(), max(1.0 - float(mean @ mean), 1e-3), 4.0)
    ood = json.dumps({"schema": "fedxray.ood/1", "output": "ood_score", "cutoff": cutoff})
    export_onnx(model, path, task="binary", labels=["opacity"], input_size=(64, 64), threshold=0.5,
                metadata={"model": "scatternet", "rounds": "3", "sites": json.dumps(sorted(EPSILON)),
                          "epsilon": json.dumps(EPSILON), "ood": ood}, ood=OodScore(descriptor, reference))
    return path


@pytest.fixture(scope="module")
def refusing_model(tmp_path_factory) -> Path:
    """Every image scores above this cut-off: the image check refuses them all."""
    return export_gated(tmp_path_factory.mktemp("gated") / "model.onnx", cutoff=1e-6)


@pytest.fixture(scope="module")
def accepting_model(tmp_path_factory) -> Path:
    return export_gated(tmp_path_factory.mktemp("gated") / "model.onnx", cutoff=1e6)


def _texts(ds) -> list[str]:
    """Every TEXT value and concept name meaning in an SR content tree."""
    out = []
    for item in ds.get("ContentSequence", []):
        if "TextValue" in item:
            out.append(str(item.TextValue))
        for name in item.get("ConceptNameCodeSequence", []):
            out.append(str(name.CodeMeaning))
        out.extend(_texts(item))
    return out


def _json_lines(capsys) -> list[dict]:
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]


def test_the_image_check_refuses_answers_and_writes_a_not_assessed_sr(refusing_model, patient_dicom, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["--model", str(refusing_model), str(patient_dicom), "--out", str(out), "--json"]) == 0
    [rec] = _json_lines(capsys)
    assert rec["assessed"] is False and rec["probabilities"] == {} and rec["positive"] == []
    assert "out-of-distribution score" in rec["reason"] and rec["ood_score"] > 1e-6 and rec["gate"] == "on"
    assert rec["heatmap_png"] is None and rec["heatmap_dcm"] is None and not list(out.glob("*heatmap*"))
    sr = hd.sr.srread(rec["sr"])
    text = _texts(sr)
    assert any(t.startswith("Not assessed: the image does not look like") for t in text), text
    assert "Probability" not in text and sr.SeriesDescription == "fedxray AI: not assessed"


def test_an_assessed_image_says_so_and_keeps_its_result(accepting_model, patient_dicom, tmp_path, capsys):
    assert main(["--model", str(accepting_model), str(patient_dicom), "--out", str(tmp_path / "out"), "--json"]) == 0
    [rec] = _json_lines(capsys)
    assert rec["assessed"] is True and rec["reason"] is None and set(rec["probabilities"]) == {"opacity"}
    assert rec["heatmap_dcm"] is not None and rec["ood_score"] < 1e6


def test_header_rules_refuse_before_the_model_runs(accepting_model, patient_dicom, tmp_path, capsys):
    ds = pydicom.dcmread(patient_dicom)
    ds.ViewPosition = "LL"
    lateral = tmp_path / "lateral.dcm"
    ds.save_as(lateral, enforce_file_format=True)
    assert main(["--model", str(accepting_model), str(lateral), "--json"]) == 0
    [rec] = _json_lines(capsys)
    assert rec["assessed"] is False and rec["ood_score"] is None
    assert rec["reason"] == "View Position LL (lateral): the model was trained on frontal (PA/AP) chest views"


def test_no_gate_scores_everything_and_the_sr_says_so(refusing_model, patient_dicom, tmp_path, capsys):
    assert main(["--model", str(refusing_model), str(patient_dicom), "--out", str(tmp_path / "out"), "--json", "--no-gate"]) == 0
    [rec] = _json_lines(capsys)
    assert rec["assessed"] is True and rec["gate"] == "off" and set(rec["probabilities"]) == {"opacity"}
    sr = pydicom.dcmread(rec["sr"])
    assert any("switched off (--no-gate, research use)" in t for t in _texts(sr))


def test_a_model_without_the_check_loads_with_one_warning_and_keeps_the_header_rules(scatter_model, patient_dicom, caplog):
    assert load_onnx_model(scatter_model).ood is None
    with caplog.at_level("WARNING", logger="clinic.model"):
        scorer = Scorer(scatter_model)
    assert [r.message for r in caplog.records if "image check" in r.message] == [
        "model.onnx has no intended-use image check (exported before it existed: no ood_score output); only the header rules apply"]
    source = read_source(patient_dicom)
    assert scorer.score(source.pixels, header=source.header).assessed and scorer.gate_mode == "header-only"
    source.header.Modality = "MR"
    scored = scorer.score(source.pixels, header=source.header)
    assert not scored.assessed and scored.reason == "Modality MR: a MR image, not a chest radiograph (CR or DX)"


def test_build_outputs_applies_the_header_rules_when_the_caller_scored_pixels_only(scatter_model, patient_dicom):
    """serve scores the pixels; the SR it forwards must still say "not assessed" for a CT header."""
    scorer = Scorer(scatter_model)
    source = read_source(patient_dicom)
    source.header.Modality = "CT"
    outputs = build_outputs(source, scorer.score(source.pixels), scorer)
    assert outputs.scored is not None and not outputs.scored.assessed
    assert outputs.overlay is None and outputs.secondary_capture is None and outputs.sr is not None
    assert any(t.startswith("Not assessed: Modality CT") for t in _texts(outputs.sr))


def test_heatmap_carries_the_sr_patient_identification_and_no_free_text(scatter_model, patient_dicom, tmp_path):
    ds = pydicom.dcmread(patient_dicom)
    ds.IssuerOfPatientID = "HOSPITAL-A"
    ds.PatientComments, ds.MedicalAlerts = "secret comment", "secret alert"
    ds.AdditionalPatientHistory, ds.Occupation = "secret history", "secret job"
    ds.save_as(patient_dicom, enforce_file_format=True)
    scorer = Scorer(scatter_model)
    source = read_source(patient_dicom)
    outputs = build_outputs(source, scorer.score(source.pixels, header=source.header), scorer)
    for result in (outputs.sr, outputs.secondary_capture):
        assert result.IssuerOfPatientID == "HOSPITAL-A" and result.PatientID == ds.PatientID
        for keyword in ("PatientComments", "MedicalAlerts", "AdditionalPatientHistory", "Occupation"):
            assert keyword not in result


def _dciodvfy_errors(path: Path) -> list[str]:
    done = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("Error")]


@pytest.mark.skipif(DCIODVFY is None, reason="dciodvfy (Debian package dicom3tools) is not installed")
def test_every_sr_and_secondary_capture_passes_dciodvfy(refusing_model, accepting_model, patient_dicom, tmp_path, capsys):
    ds = pydicom.dcmread(patient_dicom)
    ds.PatientAge = "62"  # a malformed value in the source must not make the result invalid
    ds.save_as(patient_dicom, enforce_file_format=True)
    for name, model in (("assessed", accepting_model), ("refused", refusing_model)):
        assert main(["--model", str(model), str(patient_dicom), "--out", str(tmp_path / name), "--json"]) == 0
    written = sorted((tmp_path / "assessed").glob("*.dcm")) + sorted((tmp_path / "refused").glob("*.dcm"))
    assert [p.name.split(".")[-2] for p in written] == ["heatmap", "sr", "sr"]
    for path in written:
        assert _dciodvfy_errors(path) == [], path.name


@pytest.mark.skipif(DSRDUMP is None, reason="dcmtk's dsrdump is not installed")
def test_dcmtk_reads_the_not_assessed_sr(refusing_model, patient_dicom, tmp_path, capsys):
    assert main(["--model", str(refusing_model), str(patient_dicom), "--out", str(tmp_path), "--json"]) == 0
    [rec] = _json_lines(capsys)
    done = subprocess.run([DSRDUMP, "+Pl", rec["sr"]], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "Not assessed: the image does not look like" in done.stdout and "not-assessed,99FEDXRAY" in done.stdout


@pytest.fixture(scope="module")
def kermany_gated(fedxray_data, tmp_path_factory) -> Path:
    """A ScatterNet whose image check was built the federation's way (pooled sums, histogram cut-off), without
    noise, from 300 Kermany training images: the reference the real run builds, minus the DP noise."""
    import csv

    from common.ood import cutoff_from_histograms, noised_histogram, noised_sums, pool_reference
    from common.preprocess import load_pixels

    root = fedxray_data / "kermany-pneumonia"
    if not (root / "labels.csv").is_file():
        pytest.skip("kermany-pneumonia not found")
    rows = list(csv.DictReader((root / "labels.csv").open()))[::17][:300]
    images = torch.from_numpy(np.stack([to_model_input(load_pixels(root / r["path"]), (64, 64))[0] for r in rows]))
    model = build_model("scatternet", num_outputs=1)
    descriptor = descriptor_for(model)
    with torch.no_grad():
        u = descriptor(images).double().numpy()
        turned = descriptor(torch.flip(images, dims=(2, 3))).double().numpy()
    rng = np.random.default_rng(0)
    reference = pool_reference([noised_sums(u, 0.0, rng)])
    cut = cutoff_from_histograms([noised_histogram(reference.scores(u, turned, grid=descriptor.grid), 0.0, rng)], 0.0)
    path = tmp_path_factory.mktemp("kermany") / "model.onnx"
    export_onnx(model, path, task="binary", labels=["PNEUMONIA"], input_size=(64, 64), threshold=0.5,
                metadata={"model": "scatternet", "rounds": "1", "sites": "[]", "epsilon": "{}",
                          "ood": cut.to_json(reference, "test")}, ood=OodScore(descriptor, reference))
    return path


def test_a_kermany_reference_assesses_every_real_chest_dicom_and_refuses_the_rest(kermany_gated, dicom_dir, capsys):
    """Adult chest radiographs (RG1, SIIM) pass a pediatric reference; the tibia, the C-spine and the LUT patterns
    do not, and the tibia and the patterns are refused on their pixels alone (the C-spine by its 16 x 16 matrix).

    txv_Fake_MONOHR1 is the SIIM image's MONOCHROME2 pixels under a MONOCHROME1 header: displayed as its header
    says (as a viewer shows it), it is the chest with its grey levels reversed, and the image check refuses it."""
    assert main(["--model", str(kermany_gated), str(dicom_dir), "--json"]) == 0
    recs = {Path(r["file"]).name: r for r in _json_lines(capsys)}
    chest = {n for n in recs if any(k in n for k in ("RG1", "siim"))}
    assert len(chest) == 4 and all(recs[n]["assessed"] for n in chest), {n: recs[n]["ood_score"] for n in chest}
    assert not any(recs[n]["assessed"] for n in set(recs) - chest)
    inverted = recs["txv_Fake_MONOHR1.dcm"]
    siim = next(recs[n] for n in chest if "siim" in n)
    assert "out-of-distribution score" in inverted["reason"] and inverted["ood_score"] > 100 * siim["ood_score"]
    scorer = Scorer(kermany_gated, heatmaps=False)
    for name in ("pydicomdata_RG3_J2KI.dcm", "pydicomdata_vlut_04.dcm", "pydicomdata_mlut_18.dcm",
                 "pydicom_dicomdirtests_CR1_6154.dcm"):
        scored = scorer.score(read_source(dicom_dir / name).pixels)  # no header: pixels only
        assert not scored.assessed and scored.rule in ("image", "matrix"), (name, scored.ood_score)


def test_the_drift_window_keeps_its_score_histogram_when_a_refused_image_comes_first():
    """serve adds every answered image to the drift window; a refused one has no scores."""
    from clinic.drift import Observation, histograms_of

    image = to_model_input(chest(), (64, 64))
    window = histograms_of([Observation.of(image, {}), Observation.of(image, {"opacity": 0.7})])
    assert window.statistics["score:opacity"].total == 1
