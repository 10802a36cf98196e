"""``fl-predict --model M PATH... [--out DIR] [--json]`` (interface 7, docs/interfaces.md), run as a hospital runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import SECRETS, chest
from PIL import Image

from clinic.cli import main
from clinic.drift import WINDOW_FILE
from clinic.model import Scorer

FL_PREDICT = str(Path(sys.executable).parent / "fl-predict")
CONTRACT_KEYS = {"file", "sop_instance_uid", "probabilities", "positive"}


def _run(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    return subprocess.run([FL_PREDICT, *args], capture_output=True, text=True, timeout=timeout, env=env)


def test_real_dicoms_each_get_a_json_line_an_sr_and_a_heatmap_or_a_reason(scatter_model, dicom_dir, tmp_path) -> None:
    bad = tmp_path / "inbox" / "truncated.dcm"
    bad.parent.mkdir()
    bad.write_bytes((dicom_dir / "pydicomdata_RG1_UNCR.dcm").read_bytes()[:5000])
    (tmp_path / "inbox" / "notes.txt").write_text("not an image: ignored without a line")
    out = tmp_path / "out"
    run = _run("--model", str(scatter_model), str(dicom_dir), str(bad.parent), "--out", str(out), "--json")
    assert run.returncode == 0, run.stderr
    lines = [json.loads(line) for line in run.stdout.splitlines()]
    files = sorted(dicom_dir.glob("*.dcm"))
    assert [Path(r["file"]).name for r in lines] == [f.name for f in files]
    refused = {}
    for rec in lines:
        assert CONTRACT_KEYS <= set(rec)
        uid = pydicom.dcmread(rec["file"], stop_before_pixels=True).SOPInstanceUID
        assert rec["sop_instance_uid"] == uid
        assert Path(rec["sr"]).name in (f"{uid}.sr.dcm", f"{uid}-2.sr.dcm") and Path(rec["sr"]).parent == out
        sr = pydicom.dcmread(rec["sr"])
        assert sr.Modality == "SR" and sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0] \
            .ReferencedSOPSequence[0].ReferencedSOPInstanceUID == uid
        if not rec["assessed"]:  # outside the intended use: answered with a reason and an SR, no result, no heatmap
            assert rec["probabilities"] == {} and rec["positive"] == [] and rec["heatmap_png"] is None
            refused[Path(rec["file"]).name] = rec["reason"].split(":")[0]
            continue
        assert set(rec["probabilities"]) == {"opacity"} and 0.0 <= rec["probabilities"]["opacity"] <= 1.0
        assert rec["positive"] == (["opacity"] if rec["probabilities"]["opacity"] >= 0.5 else [])
        assert "heatmap" in Path(rec["heatmap_png"]).name
        assert Path(rec["heatmap_dcm"]).is_file() and Image.open(rec["heatmap_png"]).mode == "RGB"
    assert len({rec["sr"] for rec in lines}) == len(lines)  # txv_Fake_MONOHR1.dcm has the SIIM image's UID: both kept
    # the chest radiographs are assessed; the tibia, the C-spine and the LUT test patterns are not
    assert refused == {"pydicom_dicomdirtests_CR1_6154.dcm": "Body Part Examined CSPINE",
                       "pydicomdata_RG3_J2KI.dcm": "Body Part Examined EXTREMITY",
                       "pydicomdata_mlut_18.dcm": "Modality OT", "pydicomdata_vlut_04.dcm": "Modality OT"}
    errors = run.stderr.strip().splitlines()
    old_model = [line for line in errors if "has no intended-use image check" in line]
    assert len(old_model) == 1  # a model exported before the image check: one warning, then the header rules
    errors = [line for line in errors if line not in old_model]
    assert len(errors) == 2 and "txv_Fake_MONOHR1.dcm: same SOP Instance UID" in errors[0]
    assert "truncated.dcm" in errors[1] and errors[1].startswith("fl-predict: skipped")


def test_no_patient_identifier_reaches_stdout_or_the_log(scatter_model, patient_dicom, tmp_path) -> None:
    out = tmp_path / "out"
    for extra in ((), ("--json",)):
        run = _run("-v", "--model", str(scatter_model), str(patient_dicom), "--out", str(out), *extra)
        assert run.returncode == 0, run.stderr
        for value in SECRETS.values():
            assert value not in run.stdout and value not in run.stderr, f"{value} leaked"
    sr = pydicom.dcmread(next(out.glob("*.sr.dcm")))
    assert sr.PatientID == SECRETS["PatientID"]  # the planted identifier was there to leak; it stays in the DICOM outputs
    window = (out / WINDOW_FILE).read_text()
    assert all(value not in window for value in SECRETS.values()) and str(sr.SOPInstanceUID) not in window


def test_png_is_scored_without_sr(scatter_model, tmp_path, capsys) -> None:
    Image.fromarray(np.rint(chest() * 255).astype(np.uint8)).save(tmp_path / "research.png")
    assert main(["--model", str(scatter_model), str(tmp_path / "research.png"), "--out", str(tmp_path / "out"), "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["sop_instance_uid"] is None and rec["sr"] is None and rec["heatmap_dcm"] is None
    assert Path(rec["heatmap_png"]).name.startswith("sha256-") and rec["heatmap_png"].endswith(".heatmap.png")
    window = json.loads((tmp_path / "out" / WINDOW_FILE).read_text())
    assert len(window["entries"]) == 1 and set(window["entries"][0]["values"]) >= {"brightness", "score:opacity"}


def test_exit_status_when_nothing_can_be_scored(scatter_model, tmp_path, capsys) -> None:
    (tmp_path / "a.dcm").write_bytes(b"\x00" * 128 + b"DICM" + b"\x01" * 64)
    assert main(["--model", str(scatter_model), str(tmp_path / "a.dcm"), str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and "a.dcm" in err[0] and "missing" in err[1] and "nothing could be scored" in err[2]


def test_a_missing_model_is_one_line_and_exit_2(tmp_path, capsys) -> None:
    assert main(["--model", str(tmp_path / "nope.onnx"), str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope.onnx" in err[0] and "not found" in err[0]


def test_decision_is_at_the_models_threshold(scatter_model) -> None:
    scorer = Scorer(scatter_model, heatmaps=False)
    assert scorer.decide({"opacity": 0.5}) == ["opacity"]  # score >= threshold, as common.metrics
    assert scorer.decide({"opacity": 0.4999}) == []


@pytest.mark.parametrize("text", ["serve", "drift", "quantize"])
def test_subcommands_have_their_own_help(text, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main([text, "--help"])
    assert exc.value.code == 0 and f"fl-predict {text}" in capsys.readouterr().out


def test_multilabel_gets_a_heatmap_per_finding_called(patient_dicom, tmp_path, capsys) -> None:
    """Every finding called positive (up to MAX_HEATMAPS) gets its own overlay and Secondary Capture, with its own UID."""
    from conftest import export_scatternet

    from clinic.model import MAX_HEATMAPS

    labels = ("Effusion", "Infiltration", "Atelectasis", "Nodule")
    model = export_scatternet(tmp_path / "ml.onnx", labels=labels, task="multilabel", threshold=0.0)  # p >= 0: all called
    out = tmp_path / "out"
    assert main(["--model", str(model), "--out", str(out), "--json", str(patient_dicom)]) == 0
    line = json.loads(capsys.readouterr().out.splitlines()[0])
    assert set(line["positive"]) == set(labels)
    heatmaps = line["heatmaps"]
    assert len(heatmaps) == MAX_HEATMAPS and line["heatmap_label"] in heatmaps
    probs = line["probabilities"]
    assert sorted(heatmaps, key=lambda k: -probs[k]) == sorted(probs, key=lambda k: -probs[k])[:MAX_HEATMAPS]
    captures = sorted(out.glob("*.heatmap.dcm"))
    assert len(captures) == MAX_HEATMAPS and all(Path(p).is_file() for p in heatmaps.values())
    uids = {pydicom.dcmread(p).SOPInstanceUID for p in captures}
    assert len(uids) == MAX_HEATMAPS
    descriptions = {pydicom.dcmread(p).DerivationDescription.split(" for ")[1].split(",")[0] for p in captures}
    assert descriptions == set(heatmaps)
    # fl-predict does not score its own outputs when --out lies inside the input folder
    capsys.readouterr()
    assert main(["--model", str(model), "--json", str(tmp_path)]) == 0
    assert len([x for x in capsys.readouterr().out.splitlines() if x.startswith("{")]) == 1


def test_binary_model_keeps_one_heatmap(scatter_model, patient_dicom, tmp_path, capsys) -> None:
    assert main(["--model", str(scatter_model), "--out", str(tmp_path / "o"), "--json", str(patient_dicom)]) == 0
    line = json.loads(capsys.readouterr().out.splitlines()[0])
    assert list(line["heatmaps"]) == ["opacity"] and len(list((tmp_path / "o").glob("*.heatmap.*"))) == 2
