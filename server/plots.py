"""The run's plots: ``rounds.png`` (pooled AUC with its uncertainty, and loss, per round) and ``roc.png``.

What the coordinator draws are estimates from the sites' noised histograms, so each AUC point
carries its 95% interval (server/pooled_evaluation.py) and the final evaluation (the precise one,
client/eval_noise.py) is marked apart from the routine rounds. In a simulation, fl-sim adds what
only a simulation can measure (the exact pooled validation AUC of the exported round, the AUC
and operating point on held-out patients), drawn in another colour and labelled as such.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from common.noised_estimates import plain_counts


def _ci_bars(values: list[float], cis: list[Any]) -> np.ndarray:
    """Matplotlib error-bar lengths (below, above) from [low, high] intervals; 0 where none."""
    below, above = [], []
    for v, ci in zip(values, cis, strict=True):
        ok = ci and v == v and ci[0] is not None and ci[1] is not None
        below.append(max(0.0, v - ci[0]) if ok else 0.0)
        above.append(max(0.0, ci[1] - v) if ok else 0.0)
    return np.asarray([below, above])


def write_plots(run_dir: Path, rounds: list[dict[str, Any]], simulation: dict[str, Any] | None = None,
                export_round: int | None = None) -> list[Path]:
    """rounds.png and, when the exported round (default: the last) has binary histograms, roc.png;
    ``simulation``: metrics.json's entry of that name (fl-sim adds it after the run)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    out: list[Path] = []
    if not rounds:
        return out
    simulation = simulation or {}
    r = np.asarray([x["round"] for x in rounds])
    auc = [np.nan if x.get("pooled_auc") is None else float(x["pooled_auc"]) for x in rounds]
    bars = _ci_bars(auc, [x.get("pooled_auc_ci") for x in rounds])
    final = np.asarray([bool(x.get("eval_final")) for x in rounds])
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for mask, style, label in ((~final, "o", "estimate from noised histograms, 95% CI"),
                               (final, "s", "final evaluation (precise noise), 95% CI")):
        if mask.any():
            a1.errorbar(r[mask], np.asarray(auc)[mask], yerr=bars[:, mask], fmt=style, capsize=3, color="tab:blue",
                        mfc="white" if style == "o" else "tab:blue", label=label)
    a1.plot(r, auc, "-", color="tab:blue", alpha=0.3)
    missing = np.isnan(np.asarray(auc, dtype=float))
    if missing.any():  # a round whose noised counts left a class without images: said, not drawn
        a1.plot(r[missing], np.full(missing.sum(), 0.42), "x", color="grey", label="not estimable (noise)")
    exact = simulation.get("exact_validation") or {}
    if exact.get("auc") is not None:
        a1.plot([exact["round"] + 0.1], [exact["auc"]], "*", ms=12, color="tab:green",  # beside the estimate, not on it
                label=f"exact pooled validation AUC {exact['auc']:.3f} (simulation only)")
    held = simulation.get("holdout") or {}
    if held.get("auc") is not None:
        a1.plot([(exact.get("round") or export_round or r[-1]) + 0.2], [held["auc"]], "D", color="tab:purple",
                label=f"held-out patients AUC {held['auc']:.3f} (simulation only)")
    lows = [ci[0] for x in rounds if (ci := x.get("pooled_auc_ci")) and ci[0] is not None]
    a1.set(xlabel="round", ylabel="pooled validation AUC", ylim=(min([0.4, *lows]), 1.02), title="Pooled AUC")
    a1.legend(fontsize=7, loc="lower right")
    a1.grid(alpha=0.3)
    if any(x.get("train_loss") is not None for x in rounds):  # sites send no training loss under DP
        a2.plot(r, [x.get("train_loss") or np.nan for x in rounds], "o-", label="train (weighted)")
    a2.plot(r, [x.get("eval_loss") or np.nan for x in rounds], "s--",
            label="validation (rough estimate from noised histograms, no interval)")
    a2.set(xlabel="round", ylabel="loss", title="Loss")
    a2.legend(fontsize=7)
    a2.grid(alpha=0.3)
    for axis in (a1, a2):
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole numbers
    fig.tight_layout()
    path = Path(run_dir) / "rounds.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    out.append(path)
    roc = _roc_plot(run_dir, rounds, simulation, plt, export_round)
    return out + ([roc] if roc else [])


def _roc_plot(run_dir: Path, rounds: list[dict[str, Any]], simulation: dict[str, Any], plt: Any,
              export_round: int | None) -> Path | None:
    """The pooled ROC of the exported round (the last unless told), its operating point with the intervals."""
    chosen_round = export_round or (simulation.get("exact_validation") or {}).get("round")
    chosen = next((x for x in rounds if x.get("round") == chosen_round), rounds[-1])
    sites = [s for s in chosen.get("sites", {}).values() if s.get("hist_pos")]
    if not sites:
        return None
    pos, neg = plain_counts([s["hist_pos"] for s in sites], [s["hist_neg"] for s in sites])
    if pos.sum() <= 0 or neg.sum() <= 0:
        return None
    tpr = np.concatenate([[0.0], np.cumsum(pos[::-1]) / pos.sum()])
    fpr = np.concatenate([[0.0], np.cumsum(neg[::-1]) / neg.sum()])
    fig, ax = plt.subplots(figsize=(4.6, 4.6))
    ci = chosen.get("pooled_auc_ci") or [None, None]
    auc = chosen.get("pooled_auc") or float("nan")
    label = f"pooled AUC {auc:.3f}" + (f" (95% CI {ci[0]:.3f}-{ci[1]:.3f})" if ci[0] is not None else "")
    ax.plot(fpr, tpr, "-o", ms=3, color="tab:red", label=label + ", estimate")
    sens, spec = chosen.get("sensitivity"), chosen.get("specificity")
    if sens is not None and spec is not None and sens == sens and spec == spec:
        s_ci, p_ci = chosen.get("sensitivity_ci"), chosen.get("specificity_ci")
        xerr = _ci_bars([1 - spec], [[1 - p_ci[1], 1 - p_ci[0]]] if p_ci and p_ci[0] is not None else [None])
        yerr = _ci_bars([sens], [s_ci])
        ax.errorbar([1 - spec], [sens], xerr=xerr, yerr=yerr, fmt="ks", capsize=3,
                    label=f"operating point ({chosen.get('operating_point', 'youden')}): sens {sens:.2f}, spec {spec:.2f}")
    held = simulation.get("holdout") or {}
    if held.get("sensitivity") is not None and held.get("specificity") is not None:
        ax.plot([1 - held["specificity"]], [held["sensitivity"]], "D", color="tab:purple",
                label=f"held-out patients at the threshold (simulation only): sens {held['sensitivity']:.2f}, "
                      f"spec {held['specificity']:.2f}")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title=f"Pooled ROC, round {chosen['round']}")
    ax.legend(loc="lower right", fontsize=6)
    fig.tight_layout()
    path = Path(run_dir) / "roc.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
