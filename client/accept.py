"""`fl-client accept`: a hospital's acceptance test of a federated model before go-live, on its own images.

The federation chose the model's threshold on pooled, noised validation data from other hospitals
(docs/clinic.md). Before the model reaches its radiologists a site measures it on its own labelled
images (read and scored exactly as `fl-client evaluate` does: client/evaluate.py) and may set its
own operating point there. Nothing leaves the site: the report, the plots and the site's copy of
the model stay in its folders.

It reports the AUC with its bootstrap interval, sensitivity and specificity (Wilson 95% intervals)
at the federation's threshold and at the site's chosen one, and a calibration plot; then writes a
site copy of the model: the same graph, with ``fedxray.threshold`` set to the site's threshold and
``fedxray.operating_point`` saying which rule set it, by which site, when, on how many images and
how well it is known (``set_by: site``); the federation's operating point stays in
``fedxray.federation_operating_point`` and the original file's hash in ``fedxray.federation_sha256``.
fl-predict run on that copy names the site's operating point in its JSON and SR.

A site with too few positives or negatives to pin its threshold down (the Wilson interval of the
sensitivity or specificity there wider than +-0.10, or fewer than 10 of a class) is refused with one
line naming how many it would need; the federation's threshold then stays.
"""

from __future__ import annotations

import hashlib
import json
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from client.evaluate import EvaluationError, gate_lines, json_safe, score_site
from common import metrics
from common.cache import atomic_write_bytes
from common.operating_point import OperatingPoint, threshold_from_scores

#: The widest 95% interval (half-width) of the sensitivity or specificity at a site's own threshold.
MAX_HALF_WIDTH = 0.10
#: And at least this many images of each class.
MIN_PER_CLASS = 10
Z95 = 1.959963984540054


def wilson(successes: int, n: int) -> tuple[float, float, float]:
    """(rate, low, high): the Wilson score 95% interval of a proportion; nan when n is 0."""
    if n <= 0:
        return math.nan, math.nan, math.nan
    p = successes / n
    centre = (p + Z95 ** 2 / (2 * n)) / (1 + Z95 ** 2 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95 ** 2 / (4 * n * n)) / (1 + Z95 ** 2 / n)
    return p, max(0.0, centre - half), min(1.0, centre + half)


def rates_at(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, list[float]]:
    """Sensitivity and specificity of ``p >= threshold`` with their Wilson intervals ([rate, low, high])."""
    c = metrics.confusion(y, p, threshold)
    return {"sensitivity": list(wilson(c["tp"], c["tp"] + c["fn"])),
            "specificity": list(wilson(c["tn"], c["tn"] + c["fp"]))}


def _needed(rate: float) -> int:
    """Images of a class for a Wilson half-width of about MAX_HALF_WIDTH at ``rate``."""
    r = min(max(rate, 0.5), 0.99) if rate == rate else 0.5
    return max(MIN_PER_CLASS, math.ceil(Z95 ** 2 * r * (1 - r) / MAX_HALF_WIDTH ** 2))


def too_few(y: np.ndarray, site_rates: dict[str, list[float]]) -> str | None:
    """Why this site cannot set its own operating point (one line), or None."""
    n_pos, n_neg = int(y.sum()), int((~y.astype(bool)).sum())
    sens, spec = site_rates["sensitivity"], site_rates["specificity"]
    wide = max(sens[2] - sens[1], spec[2] - spec[1]) / 2 if n_pos and n_neg else math.inf
    if min(n_pos, n_neg) >= MIN_PER_CLASS and wide <= MAX_HALF_WIDTH:
        return None
    return (f"{n_pos} positive and {n_neg} negative images: too few to set an operating point here (at the site's "
            f"threshold sensitivity {sens[0]:.2f} [{sens[1]:.2f}-{sens[2]:.2f}], specificity {spec[0]:.2f} "
            f"[{spec[1]:.2f}-{spec[2]:.2f}], 95% intervals wider than +-{MAX_HALF_WIDTH:.2f}); label at least "
            f"{_needed(sens[0])} positive and {_needed(spec[0])} negative images, or keep the federation's threshold")


def accept_model(model_path: str | Path, data_dir: str | Path, *, salt: bytes | str, point: OperatingPoint,
                 site: str = "site", out_dir: str | Path | None = None, site_model: str | Path | None = None,
                 bootstrap: int = 1000, positive: str | None = None, progress: bool = False,
                 gate: bool = True) -> dict[str, Any]:
    """The acceptance report; writes the site copy of the model (and the report and plots to ``out_dir``).

    Raises EvaluationError (one line) for a model that is not binary, a site with one class, or too
    few images of a class to set the operating point.
    """
    model_path = Path(model_path)
    report, scored = score_site(model_path, data_dir, salt=salt, progress=progress, positive=positive, gate=gate)
    if report["task"] != "binary":
        raise EvaluationError(f"{model_path.name} is a {report['task']} model: accept sets the operating point of a binary "
                              "model; measure this one with `fl-client evaluate`")
    y, p = scored.y.astype(bool), scored.probs[:, 0].astype(np.float64)
    federation = float(report["threshold"])
    own = threshold_from_scores(y, p, point)
    site_rates = rates_at(y, p, own)
    reason = too_few(y, site_rates)
    if reason is not None:
        raise EvaluationError(reason)
    auc_lo, auc_hi = metrics.bootstrap_auc_ci(y, p, n=bootstrap)
    target = Path(site_model) if site_model else model_path.with_name(f"{model_path.stem}.site{model_path.suffix}")
    if target.resolve() == model_path.resolve():
        raise EvaluationError(f"--site-model {target} is the federation's model: give another file name")
    report.update({
        "site": site, "positives": int(y.sum()), "negatives": int((~y).sum()),
        "auc": metrics.roc_auc(y, p), "auc_ci": [auc_lo, auc_hi], "ece": metrics.expected_calibration_error(y, p),
        "federation": {"threshold": federation, **rates_at(y, p, federation),
                       "operating_point": _meta(model_path).get("operating_point")},
        "site_operating_point": {"rule": str(point), "threshold": own, **site_rates},
        "site_model": str(target),
    })
    write_site_model(model_path, target, report)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out / "acceptance.json", json.dumps(json_safe(report), indent=2).encode())
        _plots(out, y, p, report)
    return report


def _meta(path: Path) -> dict[str, Any]:
    from common.onnx_export import load_onnx_model

    meta = dict(load_onnx_model(path).meta)
    for key in ("operating_point", "warnings"):
        try:
            meta[key] = json.loads(meta[key]) if key in meta else None
        except ValueError:
            meta[key] = None
    return meta


def write_site_model(source: Path, target: Path, report: dict[str, Any]) -> None:
    """The federation's model with the site's threshold and operating point in its metadata (same graph)."""
    import onnx

    from common.onnx_export import load_onnx_model

    proto = onnx.load(str(source))
    props = {p.key: p.value for p in proto.metadata_props}
    own = report["site_operating_point"]
    operating = {"rule": own["rule"], "set_by": "site", "site": report["site"],
                 "set_on": datetime.now(UTC).isoformat(timespec="seconds"), "threshold": own["threshold"],
                 "sensitivity": own["sensitivity"], "specificity": own["specificity"],
                 "images": report["images"], "positives": report["positives"], "negatives": report["negatives"],
                 "estimate": "on the site's own labelled images (exact counts; Wilson 95% intervals)"}
    updates = {"fedxray.threshold": repr(float(own["threshold"])),
               "fedxray.operating_point": json.dumps(json_safe(operating)),
               "fedxray.federation_sha256": hashlib.sha256(source.read_bytes()).hexdigest(),
               "fedxray.federation_threshold": props.get("fedxray.threshold", "")}
    if "fedxray.operating_point" in props:
        updates["fedxray.federation_operating_point"] = props["fedxray.operating_point"]
    kept = [p for p in proto.metadata_props if p.key not in updates]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    for key, value in updates.items():
        proto.metadata_props.add(key=key, value=value)
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(target, proto.SerializeToString())
    check = load_onnx_model(target)  # the copy must load as a fedxray model and carry the site's threshold
    if abs(float(check.meta["threshold"]) - float(own["threshold"])) > 1e-12:
        raise EvaluationError(f"{target}: the site copy does not carry the site's threshold; nothing to use")


def _plots(out: Path, y: np.ndarray, p: np.ndarray, report: dict[str, Any]) -> None:
    """roc.png with both operating points; calibration.png (observed rate against mean probability, 10 bins)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fpr, tpr, _ = metrics.roc_curve(y, p)
    fig, ax = plt.subplots(figsize=(4.6, 4.6))
    ax.plot(fpr, tpr, color="tab:red", label=f"AUC {report['auc']:.3f} ({report['auc_ci'][0]:.3f}-{report['auc_ci'][1]:.3f})")
    for key, marker, name in (("federation", "ks", "federation"), ("site_operating_point", "D", "this site")):
        entry = report[key]
        ax.plot([1 - entry["specificity"][0]], [entry["sensitivity"][0]], marker,
                label=f"{name}: threshold {entry['threshold']:.3g}, sens {entry['sensitivity'][0]:.2f}, "
                      f"spec {entry['specificity'][0]:.2f}")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title="ROC on this site's images")
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "roc.png", dpi=110)
    plt.close(fig)
    order = np.argsort(p)
    groups = [g for g in np.array_split(order, min(10, max(1, p.size // 5))) if g.size]
    mean_p = [float(p[g].mean()) for g in groups]
    observed = [float(y[g].mean()) for g in groups]
    fig, ax = plt.subplots(figsize=(4.6, 4.6))
    ax.plot([0, 1], [0, 1], ":", color="grey", label="perfect calibration")
    ax.plot(mean_p, observed, "o-", color="tab:blue", label=f"this site (ECE {report['ece']:.3f})")
    ax.set(xlabel="mean predicted probability (equal-count groups)", ylabel="observed share positive",
           title="Calibration on this site's images", xlim=(0, 1), ylim=(0, 1))
    ax.legend(loc="upper left", fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "calibration.png", dpi=110)
    plt.close(fig)


def render_acceptance(report: dict[str, Any]) -> str:
    """What the site reads: the model on its images, at both operating points, and where the site copy is."""

    def rates(entry: dict[str, Any]) -> str:
        s, c = entry["sensitivity"], entry["specificity"]
        return (f"threshold {entry['threshold']:.3f}: sensitivity {s[0]:.3f} ({s[1]:.3f}-{s[2]:.3f}), "
                f"specificity {c[0]:.3f} ({c[1]:.3f}-{c[2]:.3f})")

    lo, hi = report["auc_ci"]
    return "\n".join([
        f"site {report['site']}: {report['images']} images ({report['positives']} positive, {report['negatives']} negative; "
        f"skipped files: {report['skipped_files']})",
        *gate_lines(report),
        f"AUC {report['auc']:.3f}  (95% CI {lo:.3f}-{hi:.3f}); calibration ECE {report['ece']:.3f}",
        f"federation's operating point, {rates(report['federation'])}",
        f"this site's operating point ({report['site_operating_point']['rule']}), {rates(report['site_operating_point'])}",
        "(95% intervals: Wilson; the site's threshold was chosen on these same images, so its figures are slightly "
        "optimistic)",
        f"site copy of the model: {report['site_model']} (fl-predict --model {report['site_model']} uses this site's "
        "threshold and says so in its output and SR)",
    ])
