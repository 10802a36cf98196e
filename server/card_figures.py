"""The model card's figures, each as exact as it is: estimates from noised counts with their intervals.

Every number the coordinator has about validation data comes from the sites' noised histograms
(docs/privacy.md): the card says so beside each one and gives its 95% interval, which holds that
noise (server/pooled_evaluation.py). Only a simulation can measure the exact figures; fl-sim adds
them in a section of their own (:func:`simulation_lines`), never mixed with the estimates.
"""

from __future__ import annotations

import math
from typing import Any

#: Heading of the card's simulation-only section (fl-sim writes it after the run).
SIMULATION_HEADING = "## Simulation only: exact figures"


def _num(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _ci(values: Any, digits: int = 3) -> str:
    if not values or values[0] is None or values[1] is None:
        return ""
    return f" (95% CI {values[0]:.{digits}f}-{values[1]:.{digits}f})"


def has_intervals(record: dict[str, Any]) -> bool:
    return bool(record.get("pooled_auc_ci")) and record["pooled_auc_ci"][0] is not None


def auc_line(record: dict[str, Any], hanley_mcneil: Any) -> str:
    """The exported round's pooled AUC with an interval that holds the sites' noise (binary tasks)."""
    auc = record.get("pooled_auc")
    if has_intervals(record):
        counts = record.get("validation_counts") or {}
        return (f"{_num(auc)}{_ci(record['pooled_auc_ci'])}: an estimate from the sites' noised validation histograms "
                f"({'final evaluation' if record.get('eval_final') else 'a routine evaluation'}); the interval holds the "
                f"noise, the binning and the sampling of about {_num(counts.get('positives'), 0)} positive and "
                f"{_num(counts.get('negatives'), 0)} negative validation images (both estimates)")
    sites = record.get("sites", {}).values()
    n_pos = sum(float(s.get("val_positive") or 0) for s in sites)
    n_neg = sum(float(s.get("val_examples") or 0) for s in sites) - n_pos
    ci = hanley_mcneil(auc, n_pos, n_neg)
    if ci is None:
        return f"{_num(auc)} (an estimate from noised histograms; no interval)"
    return (f"{auc:.3f} (95% CI {ci[0]:.3f}-{ci[1]:.3f} from sampling alone, Hanley-McNeil: the noise the sites added "
            "is NOT in this interval; an estimate from noised histograms)")


def operating_point_lines(record: dict[str, Any], threshold: float, run_config: dict[str, Any],
                          calibration: Any) -> list[str]:
    """The decision rule, who set it, where, and its sensitivity and specificity with intervals (binary)."""
    rule = str(record.get("operating_point") or run_config.get("operating-point") or "youden")
    where = (f"on round {record.get('round')}'s pooled validation histograms "
             f"({'final evaluation' if record.get('eval_final') else 'routine evaluation, coarser noise'})")
    cal = (f"; probabilities calibrated by Platt scaling sigmoid({calibration['a']:.3g} x logit {calibration['b']:+.3g}), "
           "fitted on the same histograms" if calibration else "")
    return [
        f"- operating point: `{rule}`, set by the federation {where}: decision threshold {threshold:.3f}{cal}",
        f"- at that threshold: sensitivity {_num(record.get('sensitivity'))}{_ci(record.get('sensitivity_ci'))}, "
        f"specificity {_num(record.get('specificity'))}{_ci(record.get('specificity_ci'))}; estimates whose "
        "intervals hold the sites' noise and the choice of the threshold on the same data. A site sets its own "
        "operating point on its own images with `fl-client accept` (docs/clinic.md)",
    ]


def data_table(sites: list[str], last: dict[str, Any]) -> list[str]:
    """Per site: counts that are noised at the site are shown as estimates with their 95% half-width."""
    lines = ["", "## Data (per site; counts only)", "",
             "Validation counts are estimates: each site's histogram counts carry its noise, so a count is the noised "
             "total +- its 95% half-width, never more positives than images. Training images are reported exactly.", "",
             "| site | train images | validation images (estimate) | validation positives (estimate) | epsilon spent (cumulative) |",
             "|---|---|---|---|---|"]
    for s in sites:
        info = last.get("sites", {}).get(s, {})
        examples, positives = (
            f"about {_num(info.get(key))}" + (f" +- {info[key + '_ci95']:.0f}" if info.get(key + "_ci95") is not None else "")
            if info.get(key) is not None else "-" for key in ("val_examples", "val_positive"))
        lines.append(f"| {s} | {_num(info.get('num_examples'))} | {examples} | {positives} | "
                     f"{_num(last.get('epsilon', {}).get(s))} |")
    return lines


def round_table(rounds: list[dict[str, Any]]) -> list[str]:
    """Per round: the pooled estimates with their intervals and which kind of evaluation gave them."""
    lines = ["", "## Per-round metrics (pooled over all sites' validation data: estimates from noised histograms)", "",
             "| round | pooled AUC (95% CI) | sensitivity | specificity | evaluation | train loss | epsilon per site |",
             "|---|---|---|---|---|---|---|"]
    for x in rounds:
        eps = ", ".join(f"{k} {_num(v, 2)}" for k, v in sorted(x.get("epsilon", {}).items()))
        kind = ("final" if x.get("eval_final") else "routine") + (" (rough: counts within noise)" if x.get("intervals_rough") else "")
        lines.append(f"| {x['round']} | {_num(x.get('pooled_auc'))}{_ci(x.get('pooled_auc_ci'))} | "
                     f"{_num(x.get('sensitivity'))}{_ci(x.get('sensitivity_ci'), 2)} | "
                     f"{_num(x.get('specificity'))}{_ci(x.get('specificity_ci'), 2)} | {kind} | "
                     f"{_num(x.get('train_loss'))} | {eps or '-'} |")
    return lines


def method_line(record: dict[str, Any]) -> str:
    """How the pooled figures were made (replaces a claim of exactness the histograms cannot support)."""
    sites = [s for s in record.get("sites", {}).values() if s.get("hist_pos")]
    if not sites:
        return ("- Metrics are pooled from per-site score histograms whose counts are noised at each site: every "
                "validation figure above is an estimate.")
    bins = len(sites[0]["hist_pos"])
    noise = sorted({round(float(s.get("eval_noise") or 0), 2) for s in sites})
    return (f"- Metrics are pooled from each site's score histograms: {bins} bins per class (equal steps in logit), every "
            f"count plus Gaussian noise of std {', '.join(f'{n:g}' for n in noise)} at the site. The AUC is therefore "
            "exact neither to a bin nor to a count: it is an estimate, and its interval above holds both.")


def simulation_lines(simulation: dict[str, Any]) -> list[str]:
    """The card's simulation-only section: exact figures a real federation can never measure."""
    if not simulation:
        return []
    lines = [SIMULATION_HEADING, "",
             "A simulation holds every site's data on one machine, so it can score the exported model exactly; a real "
             "coordinator never can. These figures are for judging the estimates above, not properties of a deployment."]
    exact = simulation.get("exact_validation") or {}
    if exact.get("auc") is not None:
        lines.append(f"- exact pooled validation AUC of the exported round ({exact.get('round')}): {exact['auc']:.3f} over "
                     f"{exact.get('images')} validation images")
    held = simulation.get("holdout") or {}
    if held.get("auc") is not None:
        ci = held.get("auc_ci") or [None, None]
        lines.append(f"- held-out patients ({held.get('images')} images no site trained or validated on): AUC "
                     f"{held['auc']:.3f}{_ci(ci)}; at the exported threshold {_num(held.get('threshold'))} sensitivity "
                     f"{_num(held.get('sensitivity'))}, specificity {_num(held.get('specificity'))}")
    return [*lines, ""]
