"""Scoring an arm's exported model: the common test set, the NIH images and (leave-one-out) the unseen hospital.

Every figure comes from the exported ONNX file itself, run by onnxruntime on the images as the site
path reads them (the probabilities a hospital would get, ties included), so the study and
`fl-sim run`'s own hold-out score agree. Beside it, from the same weights in torch, the AUC of the
logits in float64 (``logit_auc``) and the share of images whose float32 probability is exactly 0
or 1 (``saturated``): a head with very large logits ties many images at 1.0 and loses ranking in
the exported probabilities that its logits still have.

Threshold: Youden's J on the arm's own validation data (the sites' validation splits it trained
with), from the ONNX probabilities; sensitivity and specificity on every scored set are at that
threshold. AUC intervals are 95% stratified percentile bootstrap intervals.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from simulations.study_arms import Arm, Trained, youden
from simulations.study_data import HOLDOUT, StudyData

#: Version of the scoring below; a cached arm scored by another version is scored again.
EVAL_VERSION = 3  # 3: the exported weights follow export-round (the last round by default)


def _logits(module: Any, x: np.ndarray, batch: int = 256) -> np.ndarray:
    """Logits [N] in float64 (no saturation), from a torch head or model."""
    import copy

    import torch

    m = copy.deepcopy(module).double().eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(x), batch):
            out.append(m(torch.from_numpy(np.ascontiguousarray(x[start:start + batch])).double()).numpy()[:, 0])
    return np.concatenate(out) if out else np.zeros(0)


def evaluate_arm(arm: Arm, trained: Trained, data: StudyData, s: Any, arm_dir: Path) -> dict[str, Any]:
    """{"test", "nih", "left_out", "threshold", ...}: the exported model's scores, saved as .npy beside the arm."""
    from common.metrics import binary_report, roc_auc
    from common.models import split_features
    from common.onnx_export import load_onnx_model

    onnx = load_onnx_model(trained.onnx, threads=s.threads)
    frontend, head, _ = split_features(trained.model)
    # The coordinator may have calibrated the exported probabilities (common/calibration.py: Platt,
    # a monotone map of the logits): compare the ONNX file with the same map of the torch logits.
    calibration = json.loads(onnx.raw_meta.get("fedxray.calibration", "null") or "null") or {"a": 1.0, "b": 0.0}

    def onnx_scores(x: np.ndarray) -> np.ndarray:
        return onnx.predict(x, batch_size=128)[:, 0] if len(x) else np.zeros(0, np.float32)

    val_x, val_y = data.arrays(trained.val_names, "val")
    threshold = youden(val_y, onnx_scores(val_x)) if len(val_y) else 0.5

    def report(x: np.ndarray, y: np.ndarray, features: np.ndarray | None, name: str) -> dict[str, Any]:
        scores = onnx_scores(x)
        np.save(arm_dir / f"{name}_scores.npy", scores.astype(np.float32))
        out = binary_report(y, scores, threshold, bootstrap=s.bootstrap, seed=s.seed).to_dict()
        logits = _logits(head, features if features is not None else x)
        out["logit_auc"] = roc_auc(y, logits) if len(np.unique(y)) == 2 else None
        out["saturated"] = float(np.mean((scores >= 1.0) | (scores <= 0.0)))
        mapped = logits * float(calibration["a"]) + float(calibration["b"])
        torch_probs = 0.5 * (1.0 + np.tanh(0.5 * mapped))  # the sigmoid, without overflow
        out["torch_max_abs_diff"] = float(np.max(np.abs(torch_probs - scores))) if len(y) else 0.0
        return out

    def inputs(names: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        x, y = data.arrays(names, "all")
        return x, y, data.arrays(names, "all", frontend)[0] if frontend is not None else None

    result: dict[str, Any] = {"eval_version": EVAL_VERSION, "threshold": threshold, "test": report(*inputs([HOLDOUT]), "test")}
    if data.nih is not None and arm.init is None:  # a warm-started model has seen the NIH images
        result["nih"] = report(data.nih.x, data.nih.y, data.nih.feature_array(frontend) if frontend is not None else None, "nih")
    if arm.left_out:
        result["left_out"] = {"site": arm.left_out, **report(*inputs([arm.left_out]), "left_out")}
    return result


def validation_summary(result: dict[str, Any], data: StudyData, s: Any) -> dict[str, Any]:
    """Exact (noise-free) validation AUC of the exported round and of the last round, and which round was exported.

    With export-round = best a federated coordinator chooses the exported round by the pooled
    validation AUC it can see: score histograms to which each site added Gaussian noise (its
    eval-noise). This says on the same validation patients, without that noise, what the choice gave
    against keeping the last round (the default, export-round = last: then both are the last round).
    Validation data only: nothing here looks at the test set.
    """
    from common.metrics import roc_auc

    curve = result.get("curve") or []
    if result["kind"] != "federated":
        rounds = {c["round"]: c.get("val_auc") for c in curve}
        exported = result.get("export_round") or (curve[-1]["round"] if curve else None)
        return {"exported_round": exported, "exported_val_auc": rounds.get(exported),
                "last_round": curve[-1]["round"] if curve else None, "last_val_auc": curve[-1].get("val_auc") if curve else None}
    import torch

    from common.models import build_model, split_features
    from server.checkpoint import latest_checkpoint, load_best
    from server.ema import exported_weights
    from simulations.study_arms import arm_run_config

    run_dir = Path(result["run_dir"])
    arm = Arm(result["arm"], result["kind"], model=result["model"], dp=result["dp"], epsilon=result.get("target_epsilon"),
              train_part=result.get("train_part", "all"))
    run = arm_run_config(s, arm, data.positive)
    out: dict[str, Any] = {}
    last = latest_checkpoint(run_dir)
    for label, found in (("exported", load_best(run_dir) if run.export_round == "best" else last), ("last", last)):
        if found is None:
            continue
        r, weights = (found[0], found[1]) if isinstance(found, tuple) else (found.round, exported_weights(
            found.strategy_state, found.weights))  # the coordinator's weight average when on (server/ema.py)
        model = build_model(run.model, dp=True, **run.model_kwargs())
        model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in weights.items()})
        frontend, head, _ = split_features(model)
        x, y = data.arrays(result["val_names"], "val", frontend)
        out[f"{label}_round"] = r
        out[f"{label}_val_auc"] = roc_auc(y, _logits(head, x))
        out[f"{label}_coordinator_val_auc"] = next((c.get("val_auc") for c in curve if c["round"] == r), None)
    return out
