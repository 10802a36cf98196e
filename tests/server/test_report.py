"""Model-card lines per finding (server/report.py): the threshold's rule is named beside it."""

from __future__ import annotations

from server.report import label_lines


def test_model_card_names_each_findings_threshold_rule():
    record = {"labels": {
        "Effusion": {"auc": 0.8, "threshold": 0.19, "threshold_rule": "youden", "sensitivity": 0.7, "specificity": 0.8,
                     "positives": 40.0, "negatives": 200.0},
        "Infiltration": {"auc": 0.55, "threshold": 0.9967, "threshold_rule": "prevalence", "sensitivity": 0.1,
                         "specificity": 0.94, "positives": 16.0, "negatives": 250.0},
    }}
    text = "\n".join(label_lines(record, "multilabel"))
    assert "| Effusion | " in text and "0.190 (youden)" in text
    assert "0.997 (prevalence)" in text and "Youden's J was unreliable" in text
    assert "(prevalence)" not in "\n".join(label_lines({"labels": {"Effusion": record["labels"]["Effusion"]}}, "multilabel"))
