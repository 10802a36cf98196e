"""`fl-client evaluate`: a hospital scores a federated model on its own labelled data.

The images are read exactly as training reads them (common.dataset: the DICOM display chain,
then the interface-3 resize), scored by the ONNX model in onnxruntime, and compared with the
site's labels. Everything stays on the site: the report holds counts and metrics only.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common import metrics
from common.dataset import encode_targets, scan_site
from common.intended_use import check_header, check_score, facts_from_meta
from common.onnx_export import OnnxClassifier, load_onnx_model


class EvaluationError(ValueError):
    """The site's data cannot give a meaningful score for this model; the message names the fix."""


def evaluate_model(model_path: str | Path, data_dir: str | Path, *, salt: bytes | str, out_dir: str | Path | None = None,
                   bootstrap: int = 1000, progress: bool = False, positive: str | None = None,
                   gate: bool = True) -> dict[str, Any]:
    """AUC (95% bootstrap CI), sensitivity, specificity at the model's threshold, confusion, ROC plot.

    Behind the intended-use gate (common/intended_use.py), as in the clinic: images it refuses are
    left out of the figures and counted by reason under ``gate`` (``gate=False``: all are scored).

    ``positive`` names the site's own class that is the model's positive finding (binary models),
    when the site labels it otherwise ("PNEUMONIA" for a model trained on "opacity"). An evaluation
    that would cover one class only raises :class:`EvaluationError` instead of reporting an AUC
    of nothing.
    """
    if bootstrap < 0:
        raise EvaluationError(f"--bootstrap {bootstrap}: give 0 (no interval) or a number of resamples such as 1000")
    if out_dir is not None and Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise EvaluationError(f"--out {out_dir} is a file: give a folder for evaluation.json and roc.png")
    report, scored = score_site(model_path, data_dir, salt=salt, progress=progress, positive=positive, gate=gate)
    task, labels, probs, y = report["task"], report["labels"], scored.probs, scored.y
    if task == "binary":
        br = metrics.binary_report(y, probs[:, 0], report["threshold"], bootstrap=bootstrap)
        report.update(br.to_dict() if hasattr(br, "to_dict") else asdict(br))
        if out_dir is not None:
            _roc_plot(Path(out_dir) / "roc.png", y, probs[:, 0], report)
    else:
        report["macro_auc"] = metrics.macro_auc(y, probs)
        onehot = np.eye(len(labels), dtype=np.float32)[y] if task == "multiclass" else y
        report["per_label_auc"] = dict(zip(labels, metrics.per_label_auc(onehot, probs), strict=True))
        report["label_source"] = scored.label_source
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "evaluation.json").write_text(json.dumps(json_safe(report), indent=2))
    return report


@dataclass(frozen=True)
class SiteScores:
    """The model's outputs on a site's labelled images (these stay at the site) and their targets."""

    probs: np.ndarray  # [N, C]
    y: np.ndarray  # binary: [N] 0/1; multiclass: [N] class index; multilabel: [N, C] with NaN masked
    label_source: str


def score_site(model_path: str | Path, data_dir: str | Path, *, salt: bytes | str, progress: bool = False,
               positive: str | None = None, gate: bool = True) -> tuple[dict[str, Any], SiteScores]:
    """Read the site's labelled images as training does, score them with the ONNX model: (report base, scores).

    Shared by ``fl-client evaluate`` and ``fl-client accept``, both behind the intended-use gate
    (``gate=False`` scores every image). Binary: an evaluation that would cover one class only
    raises :class:`EvaluationError`.
    """
    model = load_onnx_model(model_path)
    height, width = model.input_size
    if height != width:
        raise ValueError(f"{model_path}: non-square input {height}x{width} is not supported by the site reader")
    index = scan_site(data_dir, salt=salt, image_size=height, progress=progress)
    task = str(model.meta.get("task", "binary"))
    labels = tuple(model.labels)
    site_labels = (positive,) if positive and task == "binary" else labels
    targets = encode_targets(index, task, site_labels)
    if task == "binary":
        y_all = targets.y[:, 0] if len(targets.y) else targets.y
        n_pos = int(y_all.sum()) if len(y_all) else 0
        if n_pos == 0 or n_pos == len(y_all):
            have = ", ".join(index.class_names) or "none"
            hint = (f" Tell which of your classes is the model's '{labels[0]}' with --positive CLASS"
                    if positive is None else "")
            raise EvaluationError(
                f"only one class to score: {len(y_all)} image(s), {n_pos} labelled '{site_labels[0]}' (the site's "
                f"classes: {have}; {sum(targets.dropped.values())} image(s) of other classes left out). An AUC needs "
                f"both classes.{hint}"
            )
    images = np.stack([index.records[int(i)].pixels for i in targets.keep]).astype(np.float32) / 255.0
    kept, gate_report = _gate(model, images, [index.records[int(i)].meta for i in targets.keep], on=gate)
    if gate_report["refused"]:
        images, targets = images[kept], _subset(targets, kept)
        if len(images) == 0:
            raise EvaluationError(f"the intended-use gate refused all {gate_report['refused']} image(s) "
                                  f"({gate_report['reasons']}): none is a frontal chest radiograph this model may score")
        if task == "binary" and len(np.unique(targets.y[:, 0])) < 2:
            raise EvaluationError(f"after the intended-use gate refused {gate_report['refused']} image(s) "
                                  f"({gate_report['reasons']}) only one class is left: an AUC needs both")
    probs = model.predict(images[:, None])
    threshold = float(model.meta.get("threshold", 0.5))
    report: dict[str, Any] = {
        "model": str(model_path), "task": task, "labels": list(labels), "threshold": threshold,
        "positive_class": site_labels[0] if task == "binary" else None,
        "images": int(len(images)), "skipped_files": len(index.skipped),
        "skipped_reasons": dict(Counter(s.reason for s in index.skipped).most_common()), "left_out": targets.dropped,
        "gate": gate_report,
    }
    return report, SiteScores(probs, targets.y[:, 0] if task == "binary" else targets.y, targets.source)


def _gate(model: OnnxClassifier, images: np.ndarray, metas: list[dict[str, Any]], *,
          on: bool) -> tuple[np.ndarray, dict[str, Any]]:
    """(mask of the images the gate lets through, {"mode", "refused", "reasons": {rule: count}})."""
    ood = model.ood if on else None
    mode = "off" if not on else "on" if ood is not None else "header-only"
    keep = np.ones(len(images), dtype=bool)
    reasons: Counter[str] = Counter()
    if on:
        min_side = min(model.input_size)
        scores = model.ood_scores(images[:, None]) if ood is not None else None
        for i, meta in enumerate(metas):
            verdict = check_header(facts_from_meta(meta), min_side=min_side)
            if verdict.assessed and scores is not None:
                verdict = check_score(float(scores[i]), float(ood["cutoff"]))
            if not verdict.assessed:
                keep[i] = False
                reasons[verdict.rule] += 1
    return keep, {"mode": mode, "refused": int((~keep).sum()), "reasons": dict(reasons.most_common())}


def _subset(targets: Any, keep: np.ndarray) -> Any:
    """``targets`` restricted to the images the gate let through (``y`` and ``keep`` alike)."""
    from dataclasses import replace

    return replace(targets, y=targets.y[keep], keep=[k for k, ok in zip(targets.keep, keep, strict=True) if ok])


def json_safe(obj: Any) -> Any:
    """NaN and infinities as null, numpy numbers as Python numbers: valid JSON for every parser."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _roc_plot(path: Path, y: np.ndarray, scores: np.ndarray, report: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fpr, tpr, _ = metrics.roc_curve(y, scores)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.plot(fpr, tpr, color="tab:red", label=f"AUC {report.get('auc', float('nan')):.3f}")
    sens, spec = report.get("sensitivity"), report.get("specificity")
    if sens is not None and spec is not None:
        ax.plot([1 - spec], [sens], "ko", label=f"threshold {report['threshold']:.2f}")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title="ROC on this site's data")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def gate_lines(report: dict[str, Any]) -> list[str]:
    """What the intended-use gate did to a site's images, for evaluate's and accept's reports."""
    gate = report.get("gate") or {}
    lines = []
    if gate.get("refused"):
        by = ", ".join(f"{rule} {n}" for rule, n in gate["reasons"].items())
        lines.append(f"  not assessed {gate['refused']}: outside the intended use ({by})")
    if gate.get("mode") in ("off", "header-only"):
        lines.append("  intended-use gate off" if gate["mode"] == "off" else
                     "  intended-use gate: header rules only (the model has no image check)")
    return lines


def render_report(report: dict[str, Any]) -> str:
    lines = [f"images scored: {report['images']}  (skipped files: {report['skipped_files']})"]
    for reason, n in report.get("skipped_reasons", {}).items():
        lines.append(f"  skipped {n}: {reason}")
    for reason, n in report.get("left_out", {}).items():
        lines.append(f"  left out {n}: {reason}")
    lines += gate_lines(report)
    if report.get("positive_class") and report["positive_class"] != report["labels"][0]:
        lines.append(f"the site's class '{report['positive_class']}' scored as the model's '{report['labels'][0]}'")
    if "auc" in report:
        ci = report.get("auc_ci") or (float("nan"), float("nan"))
        lines.append(f"AUC {report['auc']:.3f}  (95% CI {ci[0]:.3f}-{ci[1]:.3f})")
        lines.append(f"at threshold {report['threshold']:.3f}: sensitivity {report['sensitivity']:.3f}, "
                     f"specificity {report['specificity']:.3f}")
        c = report.get("confusion", {})
        if c:
            lines.append(f"confusion: TP {c['tp']}  FP {c['fp']}  TN {c['tn']}  FN {c['fn']}")
        if report.get("ece") is not None:
            lines.append(f"calibration (ECE): {report['ece']:.3f}")
    elif "macro_auc" in report:
        lines.append(f"macro AUC {report['macro_auc']:.3f}")
        for label, auc in report.get("per_label_auc", {}).items():
            lines.append(f"  {label:<24} AUC {auc:.3f}" if auc == auc else f"  {label:<24} AUC - (one class only here)")
    return "\n".join(lines)
