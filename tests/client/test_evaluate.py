"""`fl-client evaluate`: a site scores an ONNX model on its own labelled DICOM folder."""

from __future__ import annotations

import json

import numpy as np
import torch
from torch import nn

from client.cli import main
from common.onnx_export import export_onnx


class _BrightIsPositive(nn.Module):
    """Logit grows with the mean brightness of the lung region: a model whose AUC we can predict."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x[:, :, 8:24, 4:12].mean(dim=(1, 2, 3)) * 20.0 - 8.0)[:, None]


def _site_and_model(tmp_path, dicom_writer, positive_name: str = "opacity"):
    site = tmp_path / "site"
    rows = ["file,label"]
    rng = np.random.default_rng(0)
    for i in range(16):
        positive = i % 2 == 1
        img = np.full((32, 32), 0.2) + rng.normal(0, 0.01, (32, 32))
        if positive:
            img[8:24, 4:12] = 0.7
        img[0, 0], img[-1, -1] = 0.0, 1.0
        dicom_writer(site / f"p{i}" / "1.dcm", np.clip(img, 0, 1), patient_id=f"ID{i}")
        rows.append(f"p{i}/1.dcm,{positive_name if positive else 'normal'}")
    (site / "labels.csv").write_text("\n".join(rows) + "\n")
    model_path = tmp_path / "model.onnx"
    export_onnx(_BrightIsPositive(), model_path, task="binary", labels=["opacity"], input_size=(32, 32), threshold=0.5,
                metadata={"model": "toy", "rounds": "1", "sites": "[]", "epsilon": "{}"})
    return site, model_path


def test_one_class_is_refused_and_the_fix_named(tmp_path, dicom_writer, capsys):
    """A site naming the finding otherwise: no silent 'AUC nan', exit 0 (issue 13); --positive maps it."""
    site, model_path = _site_and_model(tmp_path, dicom_writer, positive_name="PNEUMONIA")
    assert main(["evaluate", "--model", str(model_path), "--data", str(site), "--json"]) == 2
    err = capsys.readouterr().err
    assert "only one class" in err and "--positive" in err and len(err.strip().splitlines()) == 1
    assert main(["evaluate", "--model", str(model_path), "--data", str(site), "--positive", "PNEUMONIA", "--json",
                 "--bootstrap", "50"]) == 0
    report = json.loads(capsys.readouterr().out)  # valid JSON: no NaN anywhere
    assert report["auc"] == 1.0 and report["positive_class"] == "PNEUMONIA"


def test_out_that_is_a_file_fails_before_scoring(tmp_path, dicom_writer, capsys):
    site, model_path = _site_and_model(tmp_path, dicom_writer)
    (tmp_path / "taken").write_text("x")
    assert main(["evaluate", "--model", str(model_path), "--data", str(site), "--out", str(tmp_path / "taken")]) == 2
    assert "is a file" in capsys.readouterr().err


def test_evaluate_reports_auc_and_confusion(tmp_path, dicom_writer, capsys):
    site = tmp_path / "site"
    rows = ["file,label"]
    rng = np.random.default_rng(0)
    for i in range(16):
        positive = i % 2 == 1
        img = np.full((32, 32), 0.2) + rng.normal(0, 0.01, (32, 32))
        if positive:
            img[8:24, 4:12] = 0.7  # an opacity where the toy model looks
        img[0, 0], img[-1, -1] = 0.0, 1.0  # no window in these files: pin the min-max display range
        dicom_writer(site / f"p{i}" / "1.dcm", np.clip(img, 0, 1), patient_id=f"ID{i}")
        rows.append(f"p{i}/1.dcm,{'opacity' if positive else 'normal'}")
    (site / "labels.csv").write_text("\n".join(rows) + "\n")
    model_path = tmp_path / "model.onnx"
    export_onnx(_BrightIsPositive(), model_path, task="binary", labels=["opacity"], input_size=(32, 32), threshold=0.5,
                metadata={"model": "toy", "rounds": "1", "sites": "[]", "epsilon": "{}"})
    out = tmp_path / "eval"
    assert main(["evaluate", "--model", str(model_path), "--data", str(site), "--out", str(out), "--bootstrap", "200"]) == 0
    text = capsys.readouterr().out
    assert "AUC 1.000" in text and "TP 8" in text and "TN 8" in text
    report = json.loads((out / "evaluation.json").read_text())
    assert report["images"] == 16 and report["sensitivity"] == 1.0 and report["specificity"] == 1.0
    assert (out / "roc.png").stat().st_size > 1000
    assert "ID1" not in json.dumps(report)


def test_evaluate_missing_model_one_line(tmp_path, capsys):
    (tmp_path / "NORMAL").mkdir()
    assert main(["evaluate", "--model", str(tmp_path / "nope.onnx"), "--data", str(tmp_path)]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
