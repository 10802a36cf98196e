"""What a run leaves in its run directory (interface 4, docs/interfaces.md): metrics.json, plots, model card.

Everything here is built from aggregate information the coordinator legitimately holds: per-site
counts and prevalence, per-site metrics, epsilon per site and summed score histograms. No site
sends anything that identifies a patient or a file, so nothing here can.
"""

from __future__ import annotations

import json
import math
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from common.cache import atomic_write_bytes
from common.noised_estimates import plain_counts
from server import card_figures
from server.plots import write_plots as write_plots
from server.pooled_evaluation import release_edges


def json_safe(obj: Any) -> Any:
    """JSON-safe: NaN/Inf become null, numpy scalars plain numbers."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def write_metrics(run_dir: Path, run_name: str, run_config: dict[str, Any], rounds: list[dict[str, Any]],
                  extra: dict[str, Any] | None = None) -> Path:
    doc = {"run": run_name, "config": run_config, "rounds": rounds, **(extra or {})}
    path = Path(run_dir) / "metrics.json"
    atomic_write_bytes(path, json.dumps(json_safe(doc), indent=2).encode())
    _like_other_files(path)
    return path


def fitness_warnings(record: dict[str, Any], threshold: float) -> list[str]:
    """Plain reasons the exported model is not fit for use, for the card, metrics.json and the summary.

    ``threshold`` is the exported one (on the calibrated probabilities); the share of images called
    positive is read at the round's own threshold, on the scores the histograms were made of.
    """
    out = []
    auc = record.get("pooled_auc")
    if auc is None or auc != auc:
        out.append("no pooled validation AUC was measured: the model's accuracy is unknown")
    elif auc < 0.6:
        out.append(f"pooled validation AUC {auc:.3f} is near chance (0.5): the model is not fit for use")
    hists = pooled_histograms(record)
    if hists:
        pos, neg = plain_counts([h["pos"] for h in hists], [h["neg"] for h in hists])
        counts = pos + neg
        edges = release_edges(counts.size)
        k = int(np.searchsorted(edges, float(record.get("threshold", threshold)), side="left"))
        share = float(counts[k:].sum() / counts.sum()) if counts.sum() > 0 else float("nan")
        if share == share and (share > 0.98 or share < 0.02):
            side = "positive" if share > 0.98 else "negative"
            out.append(f"at the decision threshold {threshold:.3g} about {share:.0%} of the validation images are called "
                       f"positive: nearly every image is called {side}")
    return out


def data_warnings(data_source: str) -> list[str]:
    """Why a model trained in a simulation is not for patients (fl-sim's data source, from provenance)."""
    if data_source == "synthetic":
        return ["trained on synthetic phantom radiographs (fl-sim): a demonstration, not for use on patients"]
    if data_source:
        return [f"trained on simulated hospitals made from a public research set ({data_source.removeprefix('images:')}), "
                "not on a hospital's own patients: not for use on patients"]
    return []


def model_warnings(record: dict[str, Any], threshold: float, data_source: str = "") -> list[str]:
    """Every warning the exported model carries: in the card, metrics.json, the ONNX metadata
    (``fedxray.warnings``), the MLflow registry tags and fl-predict's output."""
    return fitness_warnings(record, threshold) + data_warnings(data_source)


def pooled_histograms(round_record: dict[str, Any]) -> list[dict[str, list[int]]]:
    sites = round_record.get("sites", {})
    return [{"pos": s["hist_pos"], "neg": s["hist_neg"]} for s in sites.values() if s.get("hist_pos")]


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def hanley_mcneil_ci(auc: float | None, n_pos: float, n_neg: float) -> tuple[float, float] | None:
    """95% interval of an AUC from its positive and negative counts (Hanley & McNeil 1982); None when undefined."""
    if auc is None or auc != auc or n_pos < 1 or n_neg < 1:
        return None
    q1, q2 = auc / (2 - auc), 2 * auc * auc / (1 + auc)
    var = (auc * (1 - auc) + (n_pos - 1) * (q1 - auc * auc) + (n_neg - 1) * (q2 - auc * auc)) / (n_pos * n_neg)
    half = 1.96 * math.sqrt(max(var, 0.0))
    return max(0.0, auc - half), min(1.0, auc + half)


#: A finding or class with fewer pooled validation positives than this has an AUC too uncertain to rely on.
MIN_VALIDATION_POSITIVES = 10


def label_lines(record: dict[str, Any], task: str) -> list[str]:
    """Model-card lines per class / finding of a round (multiclass, multilabel): AUC with 95% CI, threshold."""
    figures = record.get("labels") or {}
    if not figures:
        return []
    lines = ["", f"Per {'finding' if task == 'multilabel' else 'class'} (one-vs-rest, pooled over the sites' validation "
             "data; every figure is an estimate from counts noised at the sites, and the AUC's interval holds that "
             "noise, the binning and the sampling):", "",
             "| label | AUC (95% CI) | threshold | sensitivity | specificity | positives (estimate) | "
             "negatives (estimate) |",
             "|---|---|---|---|---|---|---|"]
    few = []
    for label, f in figures.items():
        ci = f.get("auc_ci") or hanley_mcneil_ci(f.get("auc"), f.get("positives") or 0, f.get("negatives") or 0)
        ci = ci if ci and ci[0] is not None else None
        auc = _fmt(f.get("auc")) + (f" ({ci[0]:.3f}-{ci[1]:.3f})" if ci else "")
        rule = f" ({f['threshold_rule']})" if f.get("threshold_rule") else ""
        lines.append(f"| {label} | {auc} | "
                     f"{_fmt(f.get('threshold'))}{rule} | {_fmt(f.get('sensitivity'))} | {_fmt(f.get('specificity'))} | "
                     f"{_fmt(f.get('positives'), 0)} | {_fmt(f.get('negatives'), 0)} |")
        if (f.get("positives") or 0) < MIN_VALIDATION_POSITIVES:
            few.append(label)
    lines.append("")
    if any(f.get("threshold_rule") == "prevalence" for f in figures.values()):
        lines.append("- threshold (prevalence): Youden's J was unreliable for that finding (too few validation positives, "
                     "or a degenerate ROC calling almost every image one way); its threshold calls positive the pooled "
                     "validation prevalence of images instead (docs/tasks.md)")
    if few:
        lines.append(f"- **WARNING**: too few validation positives (< {MIN_VALIDATION_POSITIVES}) to rely on the AUC "
                     f"of {', '.join(few)}")
    return lines


def _local_epochs(run_config: dict[str, Any]) -> str:
    epochs = run_config.get("local-epochs")
    if epochs in (0, "0", None):
        return "local epochs planned by each site for at least 150 DP steps over the run"
    return f"{epochs} local epoch(s)"


def _sampling(run_config: dict[str, Any]) -> str:
    rate = float(run_config.get("sample-rate") or 0.0)
    if rate > 0:
        return f"each step samples {rate:.0%} of a site's training images"
    return f"expected batch {run_config.get('batch-size')}"


def write_model_card(run_dir: Path, *, run_name: str, run_config: dict[str, Any], rounds: list[dict[str, Any]],
                     model_info: dict[str, Any], threshold: float, export: dict[str, Any] | None,
                     simulation: dict[str, Any] | None = None) -> Path:
    """model_card.md: data per site (counts, prevalence), training and DP setup, metrics, use and limits."""
    last = rounds[-1] if rounds else {}
    sites = sorted({s for x in rounds for s in x.get("sites", {})})
    export = export or {}
    problems = list(export.get("warnings", []))  # model_warnings: fitness and data source, as everywhere
    problems += [w for w in data_warnings(str(export.get("data_source", ""))) if w not in problems]
    chosen = next((x for x in rounds if x.get("round") == export.get("round")), last)
    binary = run_config.get("task") == "binary"
    lines = [
        f"# Model card: {run_config.get('task')} {run_config.get('labels')} classifier, run {run_name}",
        "",
        f"Created {datetime.now(UTC).isoformat(timespec='seconds')} by fedxray {export.get('version', '')}"
        f" (app bundle sha256 {export.get('bundle_sha256') or 'unknown'}). Federated training across "
        f"{len(sites)} site(s); no image left any site.",
        "",
        "## Fitness for use",
        *([f"- **WARNING**: {w}" for w in problems] or ["- no warning: see the figures and limits below before any use"]),
        f"- pooled validation AUC of the exported round: {card_figures.auc_line(chosen, hanley_mcneil_ci)}",
        *(card_figures.operating_point_lines(chosen, threshold, run_config, export.get("calibration"))
          if binary and card_figures.has_intervals(chosen) else []),
        *label_lines(chosen, str(run_config.get("task"))),
        "",
        *card_figures.simulation_lines(simulation or {}),
        "## Model",
        f"- architecture: {model_info.get('name')}: {model_info.get('architecture', '')}; "
        f"{model_info.get('parameters', '?')} trained parameters; {model_info.get('dp_form', '')}; "
        + (f"initial weights from {Path(str(run_config['init-weights'])).name}" if run_config.get("init-weights")
           else "trained from scratch"),
        f"- task: {run_config.get('task')}; labels: {run_config.get('labels')}; input: 1 x "
        f"{run_config.get('image-size')} x {run_config.get('image-size')} grey, values in [0, 1] "
        "(presentation-correct, bone bright), whole image resized bilinear",
        f"- decision threshold: {threshold:.3f} (operating point `{run_config.get('operating-point', 'youden')}` on pooled "
        "validation data; see Fitness for use)"
        if binary else
        "- decision: " + ("the most likely class (softmax)" if run_config.get("task") == "multiclass" else
                          "per finding, at its own threshold (table above; ONNX metadata fedxray.thresholds)"),
        *([f"- exported weights: round {export['round']} of {len(rounds)}, the round with the best pooled validation AUC "
           f"({_fmt(export.get('pooled_auc'))}); chosen on the same validation data this card reports, so that figure "
           "is slightly optimistic: measure on data the federation never saw (`fl-client evaluate`)"]
          if export and export.get("round") is not None and run_config.get("export-round") == "best" else []),
        *([f"- exported weights: round {export['round']} of {len(rounds)}, the last round (run setting export-round = last)"]
          if export and export.get("round") is not None and run_config.get("export-round", "last") != "best" else []),
    ]
    if export:
        n_ref = int(export.get("parity_images", 0))
        on = f"{n_ref} reference radiographs and 3 random images" if n_ref else "3 random images only (no parity-data set)"
        lines.append(f"- ONNX: `model.onnx`, onnxruntime parity max abs diff {export.get('max_abs_diff', float('nan')):.2e} "
                     f"on {on}")
        if ts := export.get("torchscript"):  # the TorchScript twin (common/torchscript_export.py)
            lines.append(f"- TorchScript: `model.pt`, same metadata, parity with torch max abs diff {ts['max_abs_diff']:.2e} "
                         "on the same images"
                         if ts.get("path") else f"- TorchScript: `model.pt` **not written**: {ts.get('error')}")
    lines += card_figures.data_table(sites, last)
    dp = run_config.get("dp")
    lines += [
        "",
        "## Training",
        f"- rounds: {len(rounds)} of {run_config.get('num-server-rounds')} planned; strategy {run_config.get('strategy')}; "
        f"{_local_epochs(run_config)} per round; {_sampling(run_config)}; "
        f"optimiser {run_config.get('optimizer')} lr {run_config.get('learning-rate')}"
        + (f" momentum {run_config.get('momentum')}" if run_config.get("optimizer") == "sgd" else ""),
        f"- differential privacy: {'DP-SGD (Opacus), Poisson sampling' if dp else 'OFF'}"
        + (f"; target epsilon {run_config.get('target-epsilon')} per site for the planned rounds, delta "
           f"{run_config.get('delta')}, clipping norm {run_config.get('max-grad-norm')}; each site accounts "
           "its own spend (RDP) in its ledger and refuses rounds past its own max-epsilon" if dp else ""),
        *card_figures.round_table(rounds),
    ]
    use = ("- **Not for use on patients**: see the warnings at the top." if problems else
           "- Research use: triage support for chest radiographs of the kind the sites trained on. Not a medical "
           "device; not for diagnosis without a radiologist.")
    lines += [
        "",
        "## Intended use and limits",
        use,
        "- Privacy is per image: a patient with k images in a training split is protected at about k times the "
        "epsilon above (group privacy); each site's ledger accounts per patient over all its runs (`fl-client status`).",
        "- Validated only on the sites' own validation splits (patient-level) listed above; performance on other "
        "hospitals, populations, projections (e.g. lateral) or equipment is unknown until measured there "
        "(`fl-client evaluate`).",
        "- Differential privacy bounds what the weights reveal about any one training image at the epsilon above; "
        "it also costs accuracy, more so for small sites.",
        card_figures.method_line(chosen),
        "",
        "Plots: `rounds.png` (pooled AUC per round with its 95% interval, and loss), `roc.png` (pooled ROC of the "
        "exported round with its operating point)" + ("; both also show the simulation-only exact figures" if simulation
                                                       else "") + ".",
    ]
    path = Path(run_dir) / "model_card.md"
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())
    _like_other_files(path)
    return path


def add_simulation_figures(run_dir: Path, simulation: dict[str, Any]) -> None:
    """fl-sim, after the run: the exact figures only a simulation has, into metrics.json (``simulation``),
    the plots and the model card's section of their own (card_figures.SIMULATION_HEADING)."""
    path = Path(run_dir) / "metrics.json"
    doc = json.loads(path.read_text())
    doc["simulation"] = json_safe(simulation)
    atomic_write_bytes(path, json.dumps(doc, indent=2).encode())
    write_plots(run_dir, doc.get("rounds") or [], doc["simulation"], (doc.get("export") or {}).get("round"))
    card = Path(run_dir) / "model_card.md"
    if not card.is_file():
        return
    text = card.read_text()
    head = card_figures.SIMULATION_HEADING
    if head in text:  # a second call replaces the section
        start = text.index(head)
        end = text.find("\n## ", start + len(head))
        text = text[:start] + (text[end + 1:] if end >= 0 else "")
    section = "\n".join(card_figures.simulation_lines(doc["simulation"])) + "\n"
    at = text.find("## Model\n")
    text = text[:at] + section + text[at:] if at >= 0 else text + "\n" + section
    text = text.replace("(pooled ROC of the exported round with its operating point).",
                        "(pooled ROC of the exported round with its operating point); both also show the "
                        "simulation-only exact figures.")
    atomic_write_bytes(card, text.encode())
    _like_other_files(card)


def _like_other_files(path: Path) -> None:
    """Give a file written through a temp file the mode the process' umask gives other files (model.onnx)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)
