"""The end of a run: the best round exported to ONNX (with its provenance), metrics.json, plots, the model card.

Flower-free: the ServerApp passes what only Flower knows (the app bundle's hash) as plain strings.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from common.calibration import Calibrated, calibrated_threshold
from common.config import RunConfig
from common.models import build_model, describe
from common.onnx_export import ExportError, export_onnx, reference_batch
from common.torchscript_export import export_torchscript
from server.checkpoint import latest_checkpoint, load_best
from server.ema import exported_weights
from server.gate import export_gate
from server.pooled_evaluation import release_edges
from server.report import json_safe, model_warnings, write_metrics, write_model_card, write_plots

log = logging.getLogger("flwr.fedxray")


def provenance(run: RunConfig, bundle_sha256: str = "") -> dict[str, str]:
    """Which software made the model: fedxray's version, the app bundle's sha256 (what sites approved),
    and, in a simulation, what the hospitals' data were."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str] = {}
    try:
        out["version"] = version("fedxray")
    except PackageNotFoundError:
        out["version"] = "unknown"
    out["bundle_sha256"] = bundle_sha256
    if run.sim_root:
        out["data_source"] = simulated_source(Path(run.sim_root))
    return out


def simulated_source(sim_root: Path) -> str:
    """'synthetic' or 'images:<set>' from the simulated hospitals' manifest, 'simulated' when unknown."""
    try:
        sites = json.loads((sim_root / "sites.json").read_text())
        manifest = Path(sites[0]["data-dir"]).parent / "manifest.json"
        return str(json.loads(manifest.read_text()).get("source", "simulated"))
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return "simulated"


def finish(run_dir: Path, run_name: str, run: RunConfig, provenance: dict[str, str] | None = None) -> None:
    """Export the last checkpoint's model to ONNX and write the model card, metrics and plots."""
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        log.error("no round completed: nothing to export in %s", run_dir)
        return
    # The exported model is the last round's, or with export-round = best the round with the best
    # pooled validation AUC (post-processing either way: the sites already released every round's
    # histograms; the card says which round). Under DP the noised AUC of one round is uncertain by
    # about 0.1 and "best" picked a worse round than the last in every federated arm of the study
    # (docs/models.md), so "last" is the default.
    best = load_best(run_dir) if run.export_round == "best" else None
    # With weight-average on, the last round's model is the coordinator's running average (server/ema.py).
    export_round, weights = (best[0], best[1]) if best is not None else (ckpt.round, exported_weights(ckpt.strategy_state,
                                                                                                      ckpt.weights))
    model = build_model(run.model, dp=True, **run.model_kwargs())
    model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in weights.items()})
    gate = export_gate(ckpt.history, model, exported_last=export_round == ckpt.round)  # intended-use image check
    chosen = next((h for h in ckpt.history if h.get("round") == export_round), ckpt.history[-1] if ckpt.history else {})
    last = ckpt.history[-1] if ckpt.history else {}
    threshold = chosen.get("threshold")
    threshold = 0.5 if threshold is None else float(threshold)
    calibration = platt_from_round(chosen, run)
    if calibration is not None:
        a, b = calibration
        model = Calibrated(model, a, b)
        threshold = calibrated_threshold(threshold, a, b)
        log.info("calibrated the exported probabilities: sigmoid(%.4g * logit %+.4g), threshold %.3g", a, b, threshold)
    # Privacy is spent by every round trained, not only up to the exported one: report the total.
    epsilon = last.get("epsilon", {})
    sample = None
    if run.parity_data:
        sample = reference_batch(run.parity_data, (run.image_size, run.image_size))
        log.info("ONNX parity: %d reference radiographs from %s plus random images", len(sample), run.parity_data)
    metadata = {"fedxray.model": run.model, "fedxray.rounds": str(ckpt.round), "fedxray.export_round": str(export_round),
                **{f"fedxray.{k}": v for k, v in (provenance or {}).items()},
                "fedxray.sites": json.dumps(sorted({s for h in ckpt.history for s in h.get("sites", {})})),
                "fedxray.epsilon": json.dumps(epsilon)}
    if calibration is not None:
        metadata["fedxray.calibration"] = json.dumps({"method": "platt, on pooled validation histograms",
                                                      "a": calibration[0], "b": calibration[1]})
    # The warnings travel with the model (fl-predict shows them with every result); the operating point says
    # which rule set the threshold, where, and how well it is known.
    problems = model_warnings(chosen, threshold, str((provenance or {}).get("data_source", "")))
    operating = operating_point_record(run, chosen, threshold)
    metadata["fedxray.warnings"] = json.dumps(problems)
    if operating:
        metadata["fedxray.operating_point"] = json.dumps(json_safe(operating))
    drift = drift_reference(ckpt.history, chosen, run)
    if drift:
        metadata["fedxray.reference"] = drift
    metadata.update(label_metadata(run, chosen))
    if gate is not None:
        metadata["fedxray.ood"] = gate[2]
    report = export_onnx(
        model, run_dir / "model.onnx", sample_batch=sample, task=run.task, labels=list(run.labels),
        input_size=(run.image_size, run.image_size), threshold=threshold, metadata=metadata,
        ood=gate[0] if gate is not None else None,
    )
    torchscript = torchscript_twin(model, run_dir, sample, ood=gate[0] if gate is not None else None)
    for problem in problems:
        log.warning("exported model: %s", problem)
    export = {"max_abs_diff": report.max_abs_diff, "size_bytes": report.size_bytes,
              "parity_images": 0 if sample is None else len(sample), "round": export_round,
              "pooled_auc": chosen.get("pooled_auc"), "warnings": problems, "torchscript": torchscript, **(provenance or {}),
              "intended_use": json.loads(gate[2]) if gate is not None else None}
    if calibration is not None:
        export["calibration"] = {"a": calibration[0], "b": calibration[1]}
    write_metrics(run_dir, run_name, ckpt.run_config, ckpt.history,
                  {"export": export, "threshold": threshold, "warnings": problems, "labels": chosen.get("labels", {}),
                   **({"operating_point": operating} if operating else {})})
    write_plots(run_dir, ckpt.history, export_round=export_round)
    kwargs = run.model_kwargs()
    info = describe(run.model, num_outputs=kwargs.pop("num_outputs"), **kwargs)
    write_model_card(run_dir, run_name=run_name, run_config=ckpt.run_config, rounds=ckpt.history,
                     model_info=info, threshold=threshold, export=export)
    log.info("run %s finished: %s", run_name, run_dir)


def torchscript_twin(model: torch.nn.Module, run_dir: Path, sample: torch.Tensor | None, *,
                     ood: torch.nn.Module | None = None) -> dict:
    """model.pt beside model.onnx (common/torchscript_export.py): its parity figures, or the error that stopped it.

    The ONNX model is the primary artefact: a TorchScript failure is logged as an error and named
    on the model card, and the run still ends with its metrics and card.
    """
    try:
        ts = export_torchscript(model, run_dir / "model.pt", onnx_model=run_dir / "model.onnx", sample_batch=sample, ood=ood)
    except ExportError as err:
        log.error("model.pt (TorchScript) not written: %s", err)
        return {"path": None, "error": str(err)}
    return {"path": ts.path.name, "max_abs_diff": ts.max_abs_diff, "size_bytes": ts.size_bytes}


def label_metadata(run: RunConfig, chosen: dict) -> dict[str, str]:
    """ONNX metadata per output, named by class / finding: ``fedxray.outputs`` (label, activation, pooled AUC,
    threshold) and, for multilabel, ``fedxray.thresholds`` ({finding: threshold}, what fl-predict decides with)."""
    from server.report import json_safe

    figures = chosen.get("labels") or {}
    activation = "softmax" if run.task == "multiclass" else "sigmoid"
    outputs = [{"index": i, "label": label, "activation": activation, **{k: figures.get(label, {}).get(k)
                                                                         for k in ("auc", "threshold", "threshold_rule")}}
               for i, label in enumerate(run.labels)]
    out = {"fedxray.outputs": json.dumps(json_safe(outputs))}
    thresholds = {label: f["threshold"] for label, f in figures.items() if f.get("threshold") is not None}
    if run.task == "multilabel" and thresholds:
        out["fedxray.thresholds"] = json.dumps(json_safe(thresholds))
    return out


def drift_reference(history: list[dict], chosen: dict, run: RunConfig) -> str | None:
    """The exported model's drift reference (common/reference.py), or None when the sites sent no statistics.

    Image statistics: the last round's noised site counts (model-independent). Scores: the pooled
    noised evaluation histograms of the exported round, rebinned to the reference's score bins.
    """
    from common.reference import ReferenceError, rebin_scores, reference_from_sites

    last = history[-1] if history else {}
    parts = [s["reference_counts"] for s in last.get("sites", {}).values() if s.get("reference_counts")]
    hists = [(s["hist_pos"], s["hist_neg"]) for s in chosen.get("sites", {}).values() if s.get("hist_pos")]
    if not parts or not hists or run.task != "binary":
        return None
    pos = np.sum([np.asarray(p, float) for p, _ in hists], axis=0)
    neg = np.sum([np.asarray(n, float) for _, n in hists], axis=0)
    scores = {f"score:{run.labels[0]}": rebin_scores(pos, neg, release_edges(pos.size))}
    try:
        return reference_from_sites(parts, scores, (run.image_size, run.image_size))
    except ReferenceError as err:
        log.warning("no drift reference in the model: %s", err)
        return None


def operating_point_record(run: RunConfig, chosen: dict, threshold: float) -> dict | None:
    """``fedxray.operating_point`` and metrics.json's ``operating_point``: the rule, who set it (the federation),
    on which round's evaluation, the exported threshold and its estimated rates with their 95% intervals."""
    if run.task != "binary":
        return None
    return {"rule": str(run.operating), "set_by": "federation", "round": chosen.get("round"),
            "final_evaluation": bool(chosen.get("eval_final")), "threshold": threshold,
            "sensitivity": chosen.get("sensitivity"), "sensitivity_ci": chosen.get("sensitivity_ci"),
            "specificity": chosen.get("specificity"), "specificity_ci": chosen.get("specificity_ci"),
            "estimate": "from the sites' noised validation histograms"}


def platt_from_round(record: dict, run: RunConfig) -> tuple[float, float] | None:
    """Platt scaling (common/calibration.py) fitted on the round's pooled validation histograms; None if impossible."""
    from common.calibration import CalibrationError, fit_platt
    from common.noised_estimates import plain_counts

    hists = [(s["hist_pos"], s["hist_neg"]) for s in record.get("sites", {}).values() if s.get("hist_pos")]
    if run.task != "binary" or not hists:
        return None
    # Consistent counts (non-negative, each class keeping its noised total): clipping each count at zero put
    # images in empty bins at the far ends, and the fit flattened to reach them.
    pos, neg = plain_counts([p for p, _ in hists], [n for _, n in hists])
    try:
        return fit_platt(pos, neg, release_edges(pos.size))
    except CalibrationError as err:
        log.warning("exported probabilities not calibrated: %s", err)
        return None
