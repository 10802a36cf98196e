"""What a run leaves in its run directory (contract 4): metrics.json, plots, model card.

Everything here is built from aggregate information the coordinator legitimately holds: per-site
counts and prevalence, per-site metrics, epsilon per site and summed score histograms. No site
sends anything that identifies a patient or a file, so nothing here can.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from common import metrics
from common.cache import atomic_write_bytes


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
    return path


def pooled_histograms(round_record: dict[str, Any]) -> list[dict[str, list[int]]]:
    sites = round_record.get("sites", {})
    return [{"pos": s["hist_pos"], "neg": s["hist_neg"]} for s in sites.values() if s.get("hist_pos")]


def write_plots(run_dir: Path, rounds: list[dict[str, Any]]) -> list[Path]:
    """Per-round pooled AUC and loss, and the pooled ROC of the last round (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out: list[Path] = []
    if not rounds:
        return out
    r = [x["round"] for x in rounds]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.4))
    a1.plot(r, [x.get("pooled_auc") or np.nan for x in rounds], "o-", color="tab:blue")
    a1.set(xlabel="round", ylabel="pooled validation AUC", ylim=(0.4, 1.0), title="Pooled AUC")
    a1.grid(alpha=0.3)
    a2.plot(r, [x.get("train_loss") or np.nan for x in rounds], "o-", label="train (weighted)")
    a2.plot(r, [x.get("eval_loss") or np.nan for x in rounds], "s--", label="validation (weighted)")
    a2.set(xlabel="round", ylabel="loss", title="Loss")
    a2.legend()
    a2.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(run_dir) / "rounds.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    out.append(path)
    hists = pooled_histograms(rounds[-1])
    if hists:
        fpr, tpr = metrics.pooled_roc_from_histograms(hists)
        fig, ax = plt.subplots(figsize=(4, 4))
        ax.plot(fpr, tpr, color="tab:red", label=f"pooled AUC {rounds[-1].get('pooled_auc') or float('nan'):.3f}")
        ax.plot([0, 1], [0, 1], ":", color="grey")
        ax.set(xlabel="1 - specificity", ylabel="sensitivity", title=f"Pooled ROC, round {rounds[-1]['round']}")
        ax.legend(loc="lower right")
        fig.tight_layout()
        path = Path(run_dir) / "roc.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        out.append(path)
    return out


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


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
                     model_info: dict[str, Any], threshold: float, export: dict[str, Any] | None) -> Path:
    """model_card.md: data per site (counts, prevalence), training and DP setup, metrics, use and limits."""
    last = rounds[-1] if rounds else {}
    sites = sorted({s for x in rounds for s in x.get("sites", {})})
    lines = [
        f"# Model card: {run_name}",
        "",
        f"Created {datetime.now(UTC).isoformat(timespec='seconds')} by fedxray. Federated training across "
        f"{len(sites)} site(s); no image left any site.",
        "",
        "## Model",
        f"- architecture: {model_info.get('name')}: {model_info.get('architecture', '')}; "
        f"{model_info.get('parameters', '?')} trained parameters; {model_info.get('dp_form', '')}; "
        + (f"initial weights from {Path(str(run_config['init-weights'])).name}" if run_config.get("init-weights")
           else "trained from scratch"),
        f"- task: {run_config.get('task')}; labels: {run_config.get('labels')}; input: 1 x "
        f"{run_config.get('image-size')} x {run_config.get('image-size')} grey, values in [0, 1] "
        "(presentation-correct, bone bright), whole image resized bilinear",
        f"- decision threshold: {threshold:.3f} (maximises sensitivity + specificity on pooled validation data)",
        *([f"- exported weights: round {export['round']} of {len(rounds)}, the round with the best pooled validation AUC "
           f"({_fmt(export.get('pooled_auc'))}); chosen on the same validation data this card reports, so that figure "
           "is slightly optimistic: measure on data the federation never saw (`fl-client evaluate`)"]
          if export and export.get("round") is not None else []),
    ]
    if export:
        n_ref = int(export.get("parity_images", 0))
        on = f"{n_ref} reference radiographs and 3 random images" if n_ref else "3 random images only (no parity-data set)"
        lines.append(f"- ONNX: `model.onnx`, onnxruntime parity max abs diff {export.get('max_abs_diff', float('nan')):.2e} "
                     f"on {on}")
    lines += [
        "",
        "## Data (per site; counts only)",
        "",
        "| site | train images | validation images | validation positives | epsilon spent (cumulative) |",
        "|---|---|---|---|---|",
    ]
    for s in sites:
        info = last.get("sites", {}).get(s, {})
        lines.append(
            f"| {s} | {_fmt(info.get('num_examples'))} | {_fmt(info.get('val_examples'))} | "
            f"{_fmt(info.get('val_positive'))} | {_fmt(last.get('epsilon', {}).get(s))} |"
        )
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
        "",
        "## Per-round metrics (pooled over all sites' validation data)",
        "",
        "| round | pooled AUC | sensitivity | specificity | train loss | epsilon per site |",
        "|---|---|---|---|---|---|",
    ]
    for x in rounds:
        eps = ", ".join(f"{k} {_fmt(v, 2)}" for k, v in sorted(x.get("epsilon", {}).items()))
        lines.append(
            f"| {x['round']} | {_fmt(x.get('pooled_auc'))} | {_fmt(x.get('sensitivity'))} | "
            f"{_fmt(x.get('specificity'))} | {_fmt(x.get('train_loss'))} | {eps or '-'} |"
        )
    lines += [
        "",
        "## Intended use and limits",
        "- Research use: triage support for chest radiographs of the kind the sites trained on. Not a medical "
        "device; not for diagnosis without a radiologist.",
        "- Validated only on the sites' own validation splits (patient-level) listed above; performance on other "
        "hospitals, populations, projections (e.g. lateral) or equipment is unknown until measured there "
        "(`fl-client evaluate`).",
        "- Differential privacy bounds what the weights reveal about any one training image at the epsilon above; "
        "it also costs accuracy, more so for small sites.",
        "- Metrics are pooled from per-site score histograms (200 bins): AUC is exact to within a bin.",
        "",
        "Plots: `rounds.png` (pooled AUC and loss per round), `roc.png` (pooled ROC, last round).",
    ]
    path = Path(run_dir) / "model_card.md"
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())
    return path
