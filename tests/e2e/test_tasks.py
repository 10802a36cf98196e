"""fl-sim end to end for a multilabel task from an NIH-style table (finding_labels, '|'-separated).

A tiny image set in a tmp folder, partitioned into 2 hospitals that keep the findings column; one
DP round. The exported model has one output per finding, named by finding, with per-finding AUC
in metrics.json, the model card and the ONNX metadata.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from common.onnx_export import load_onnx_model
from simulations.cli import main

pytestmark = pytest.mark.e2e
FINDINGS = ("Effusion", "Infiltration", "Atelectasis")


@pytest.fixture(scope="module")
def nih_style_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("nih-style")
    rng = np.random.default_rng(0)
    rows = ["path,label,finding_labels,patient_id"]
    for p in range(36):
        present = [f for f in FINDINGS if rng.random() < 0.35]
        img = rng.integers(30, 90, size=(32, 32)).astype(np.uint8)
        for j, f in enumerate(FINDINGS):  # each finding brightens its own band
            if f in present:
                img[4 + 9 * j: 12 + 9 * j, 6:26] = 220
        folder = "1_abnormal" if present else "0_normal"
        (root / folder).mkdir(exist_ok=True)
        Image.fromarray(img).save(root / folder / f"{p:03d}.png")
        rows.append(f"{folder}/{p:03d}.png,{int(bool(present))},{'|'.join(present) or 'No Finding'},{p}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture(scope="module")
def multilabel_run(nih_style_set, tmp_path_factory):
    out = tmp_path_factory.mktemp("sim")
    rc = main(["run", "--data", str(nih_style_set), "--out", str(out), "--name", "ml", "--sites", "2", "--rounds", "1",
               "--image-size", "32", "--holdout", "0", "--partition", "iid", "--local-epochs", "1",
               "--set", "task=multilabel", "--set", f"labels={','.join(FINDINGS)}", "--set", "tracking-uri=off"])
    return rc, out / "ml"


def test_hospitals_keep_the_findings_column(multilabel_run):
    _, root = multilabel_run
    header = (root / "hospitals" / "hospital-a" / "labels.csv").read_text().splitlines()[0]
    assert header == "file,label,finding_labels"


def test_model_has_one_output_per_finding_with_its_auc(multilabel_run):
    rc, root = multilabel_run
    assert rc == 0, (root / "run.log").read_text()[-3000:] if (root / "run.log").exists() else "no run log"
    model = load_onnx_model(root / "run" / "model.onnx")
    assert model.labels == list(FINDINGS) and model.meta["task"] == "multilabel"
    probs = model.predict(np.random.default_rng(1).random((2, 1, 32, 32), dtype=np.float32))
    assert probs.shape == (2, 3)
    outputs = json.loads(model.meta["outputs"])
    assert [o["label"] for o in outputs] == list(FINDINGS) and {o["activation"] for o in outputs} == {"sigmoid"}
    doc = json.loads((root / "run" / "metrics.json").read_text())
    assert list(doc["labels"]) == list(FINDINGS) and list(doc["rounds"][-1]["labels"]) == list(FINDINGS)
    assert all(doc["labels"][f]["auc"] is None or 0.0 <= doc["labels"][f]["auc"] <= 1.0 for f in FINDINGS)  # null: not estimable
    assert {doc["labels"][f]["threshold_rule"] for f in FINDINGS} <= {"youden", "prevalence", "default"}
    assert [o["threshold_rule"] for o in outputs] == [doc["labels"][f]["threshold_rule"] for f in FINDINGS]
    card = (root / "run" / "model_card.md").read_text()
    assert "Per finding" in card and all(f"| {f} |" in card for f in FINDINGS)
