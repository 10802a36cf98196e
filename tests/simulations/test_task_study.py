"""The task study's pieces that decide its figures (simulations/task_study.py): arms, pooled site, CIs."""

from __future__ import annotations

import csv
import math

import numpy as np

from simulations.task_study import ARMS, auc_table, fl_sim_command, merge_sites


def test_arms_cover_the_issue_and_pass_their_task_settings(tmp_path):
    names = {a.name for a in ARMS}
    assert {"kermany-pooled", "kermany-fedavg", "kermany-pooled-dp", "kermany-fedavg-dp", "nih-fedavg", "nih-fedavg-dp"} <= names
    by = {a.name: a for a in ARMS}
    cmd = " ".join(fl_sim_command(by["kermany-fedavg-dp"], tmp_path, tmp_path, rounds=8, epsilon=3.0, seed=0, image_size=64))
    assert "task=multiclass" in cmd and "label-column=subtype" in cmd and "--target-epsilon 3" in cmd and "--no-dp" not in cmd
    cmd = " ".join(fl_sim_command(by["nih-fedavg-posw4"], tmp_path, tmp_path, rounds=8, epsilon=3.0, seed=0, image_size=64))
    assert "task=multilabel" in cmd and "labels=Effusion,Infiltration,Atelectasis" in cmd and "pos-weight=4" in cmd
    assert "--no-dp" in cmd


def test_the_pooled_site_holds_every_hospitals_images_and_labels(tmp_path):
    for site, rows in (("hospital-a", [("p1/1.dcm", "normal", "virus")]), ("hospital-b", [("p2/1.dcm", "pneumonia", "bacteria")])):
        (tmp_path / site / rows[0][0]).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / site / rows[0][0]).write_bytes(b"x")
        with open(tmp_path / site / "labels.csv", "w", newline="") as fh:
            csv.writer(fh).writerows([("file", "label", "subtype"), *rows])
    merge_sites([tmp_path / "hospital-a", tmp_path / "hospital-b"], tmp_path / "pooled")
    rows = list(csv.DictReader(open(tmp_path / "pooled" / "labels.csv")))
    assert [(r["file"], r["subtype"]) for r in rows] == [("hospital-a/p1/1.dcm", "virus"), ("hospital-b/p2/1.dcm", "bacteria")]
    assert all((tmp_path / "pooled" / r["file"]).is_file() for r in rows)


def test_auc_table_intervals_resample_patients():
    rng = np.random.default_rng(0)
    patients = [f"p{i // 3}" for i in range(300)]  # 3 images per patient
    y = np.stack([(rng.random(300) < 0.3), (rng.random(300) < 0.5)], axis=1).astype(float)
    y[::10, 1] = math.nan  # masked
    probs = np.stack([y[:, 0] * 0.8 + rng.random(300) * 0.2, rng.random(300)], axis=1)  # label a perfect, b chance
    out = auc_table(y, probs, patients, ("a", "b"), bootstrap=200)
    assert out["patients"] == 100 and out["images"] == 300
    assert out["labels"]["a"]["auc"] == 1.0 and out["labels"]["a"]["ci"] == [1.0, 1.0]
    lo, hi = out["labels"]["b"]["ci"]
    assert lo < out["labels"]["b"]["auc"] < hi and lo < 0.5 < hi
    assert out["labels"]["b"]["positives"] + out["labels"]["b"]["negatives"] == 270
    assert out["macro_ci"][0] < out["macro_auc"] < out["macro_ci"][1]
