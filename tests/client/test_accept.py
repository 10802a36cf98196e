"""`fl-client accept` on a synthetic (phantom) hospital: the site's acceptance test and its own operating point.

The "federation's" model is a small linear model fitted on the phantom hospital's own pixels and
exported with the project's exporter: an informative model with a known federation threshold, so
the test checks what accept measures and writes, and that fl-predict then uses the site's threshold
and says so (JSON and SR). New in issue 20: every test here fails on the code before it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from torch import nn

from client.cli import main as client_main
from clinic.cli import main as predict_main
from common.dataset import encode_targets, scan_site
from common.dicom import DEFAULT_SALT
from common.metrics import sens_spec
from common.onnx_export import export_onnx, load_onnx_model
from common.operating_point import OperatingPoint, threshold_from_scores
from simulations.hospitals import make_synthetic_hospitals

SIZE = 32


@pytest.fixture(scope="module")
def phantom_site(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hospitals")
    make_synthetic_hospitals(root, 1, patients_per_site=150, images_per_patient=(1, 1), prevalence=0.5,
                             corrupt_per_site=0, max_matrix=64, seed=5)
    return root / "hospital-a"


def _pixels(site: Path) -> tuple[np.ndarray, np.ndarray]:
    index = scan_site(site, salt=DEFAULT_SALT, image_size=SIZE)
    targets = encode_targets(index, "binary", ("opacity",))
    x = np.stack([index.records[int(i)].pixels for i in targets.keep]).astype(np.float32) / 255.0
    return x[:, None], targets.y[:, 0].astype(np.float32)


@pytest.fixture(scope="module")
def federation_model(phantom_site, tmp_path_factory) -> Path:
    """A linear model on 8 x 8 average-pooled pixels, fitted on the site's images, threshold 0.5 and an operating point."""
    x, y = _pixels(phantom_site)
    torch.manual_seed(0)
    model = nn.Sequential(nn.AvgPool2d(4), nn.Flatten(), nn.Linear((SIZE // 4) ** 2, 1))
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)[:, None]
    for _ in range(300):
        opt.zero_grad()
        nn.functional.binary_cross_entropy_with_logits(model(xt), yt).backward()
        opt.step()
    path = tmp_path_factory.mktemp("run") / "model.onnx"
    federation_point = {"rule": "youden", "set_by": "federation", "round": 8, "threshold": 0.5}
    export_onnx(model.eval(), path, task="binary", labels=["opacity"], input_size=(SIZE, SIZE), threshold=0.5,
                metadata={"model": "toy", "rounds": "8", "sites": "[]", "epsilon": "{}",
                          "operating_point": json.dumps(federation_point),
                          "warnings": json.dumps(["trained on synthetic phantom radiographs (fl-sim): a demonstration, "
                                                  "not for use on patients"])})
    return path


def test_accept_measures_the_model_and_writes_a_site_copy_with_its_own_threshold(phantom_site, federation_model,
                                                                                    tmp_path, capsys):
    out, site_model = tmp_path / "acceptance", tmp_path / "model.site.onnx"
    assert client_main(["accept", "--model", str(federation_model), "--data", str(phantom_site), "--operating-point",
                        "sensitivity:0.9", "--site", "st-mary", "--out", str(out), "--site-model", str(site_model),
                        "--bootstrap", "200"]) == 0
    text = capsys.readouterr().out
    assert "AUC" in text and "95% CI" in text and "federation's operating point" in text and "sensitivity:0.9" in text
    report = json.loads((out / "acceptance.json").read_text())
    assert (out / "roc.png").is_file() and (out / "calibration.png").is_file()
    lo, hi = report["auc_ci"]
    assert 0.8 < report["auc"] <= 1.0 and lo <= report["auc"] <= hi

    # The site's threshold is its rule on its own exact scores; its rates are measured there, with intervals.
    x, y = _pixels(phantom_site)
    probs = load_onnx_model(federation_model).predict(x)[:, 0]
    own = threshold_from_scores(y, probs, OperatingPoint("sensitivity", 0.9))
    site = report["site_operating_point"]
    assert site["threshold"] == pytest.approx(own) and site["sensitivity"][0] >= 0.9
    assert site["sensitivity"][1] <= site["sensitivity"][0] <= site["sensitivity"][2]
    assert report["federation"]["threshold"] == 0.5
    assert report["federation"]["sensitivity"][0] == pytest.approx(sens_spec(y, probs, 0.5)[0])

    # The site copy: same graph and outputs, the site's threshold, its operating point and the federation's kept.
    copy = load_onnx_model(site_model)
    np.testing.assert_array_equal(copy.predict(x[:4]), load_onnx_model(federation_model).predict(x[:4]))
    assert copy.meta["threshold"] == pytest.approx(own)
    point = json.loads(copy.meta["operating_point"])
    assert point["set_by"] == "site" and point["site"] == "st-mary" and point["rule"] == "sensitivity:0.9"
    assert json.loads(copy.meta["federation_operating_point"])["set_by"] == "federation"
    assert "not for use on patients" in copy.meta["warnings"]

    # fl-predict on the site copy decides at the site's threshold and names where it was set (JSON and SR).
    dicom = next(p for p in sorted(phantom_site.rglob("*.dcm")))
    assert predict_main(["--model", str(site_model), str(dicom), "--json", "--out", str(tmp_path / "sr")]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[0])
    assert record["threshold"] == pytest.approx(own)
    assert record["operating_point"]["set_by"] == "site" and record["operating_point"]["site"] == "st-mary"
    assert any("not for use on patients" in w for w in record["warnings"])
    sr = pydicom.dcmread(record["sr"])
    comments = [item.TextValue for item in sr.ContentSequence if getattr(item, "ValueType", "") == "TEXT"]
    assert any("Operating point sensitivity:0.9" in c and "set by site st-mary" in c for c in comments)


def test_the_federation_model_names_its_own_operating_point(phantom_site, federation_model, tmp_path, capsys):
    dicom = next(p for p in sorted(phantom_site.rglob("*.dcm")))
    assert predict_main(["--model", str(federation_model), str(dicom), "--json"]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[0])
    assert record["operating_point"]["set_by"] == "federation" and record["operating_point"]["rule"] == "youden"


def test_too_few_positives_is_refused_in_one_line_and_nothing_is_written(federation_model, tmp_path, capsys):
    small = tmp_path / "small"
    make_synthetic_hospitals(small, 1, patients_per_site=14, images_per_patient=(1, 1), prevalence=0.5,
                             corrupt_per_site=0, max_matrix=64, seed=9)
    site_model = tmp_path / "model.site.onnx"
    assert client_main(["accept", "--model", str(federation_model), "--data", str(small / "hospital-a"),
                        "--site-model", str(site_model), "--bootstrap", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "too few to set an operating point" in err
    assert "label at least" in err and "keep the federation's threshold" in err
    assert not site_model.exists()


def test_a_bad_operating_point_is_one_line(federation_model, phantom_site, capsys):
    assert client_main(["accept", "--model", str(federation_model), "--data", str(phantom_site),
                        "--operating-point", "sensitivity:95"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "sensitivity:0.95" in err
