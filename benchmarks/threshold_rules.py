"""Per-finding threshold rules on simulated, noised validation histograms, as JSON.

    .venv/bin/python benchmarks/threshold_rules.py --draws 200

Three sites with NIH-sample-like validation sets (47, 84 and 257 images, prevalence 12%) score a
finding with a logistic model (logit ~ N(mu, sd) + shift for positives); each site sends its
histograms with eval-noise 10 per count (common.pooled_metrics.noised_histograms), as a real run.
For every draw the thresholds of Youden's J alone (``histogram_threshold``, the rule before issue
14's fix) and of ``robust_histogram_threshold`` are applied to the exact scores: the mean true
Youden's J, the mean share of images called positive and the share of draws calling more than 70%
positive (the failure seen on the NIH sample). No torch; a few seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.pooled_metrics import EVAL_EDGES, histogram_threshold, noised_histograms, robust_histogram_threshold, score_histograms  # noqa: E402

SCENARIOS = {"weak": (-2.5, 2.0, 1.0), "confident-weak": (-6.0, 4.0, 2.0), "learnt": (-3.0, 1.5, 2.5),
             "confident": (-8.0, 5.0, 3.0)}


def draw(seed: int, mu: float, sd: float, shift: float, sites=(47, 84, 257), prevalence=0.12, noise=10.0):
    rng = np.random.default_rng(seed)
    hists, ys, ps = [], [], []
    for n in sites:
        y = rng.random(n) < prevalence
        p = 1.0 / (1.0 + np.exp(-(rng.normal(mu, sd, n) + shift * y)))
        hists.append(noised_histograms(score_histograms(y, p, edges=EVAL_EDGES), noise, rng))
        ys.append(y)
        ps.append(p)
    return hists, np.concatenate(ys), np.concatenate(ps)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--draws", type=int, default=200)
    args = ap.parse_args()
    out: dict = {"draws": args.draws, "eval_noise": 10.0, "sites": [47, 84, 257], "prevalence": 0.12, "scenarios": {}}
    for name, (mu, sd, shift) in SCENARIOS.items():
        figures: dict[str, list] = {"youden-only": [], "robust": []}
        rules: dict[str, int] = {}
        for seed in range(args.draws):
            hists, y, p = draw(seed, mu, sd, shift)
            robust, rule = robust_histogram_threshold(hists, EVAL_EDGES)
            rules[rule] = rules.get(rule, 0) + 1
            for key, t in (("youden-only", histogram_threshold(hists, EVAL_EDGES)), ("robust", robust)):
                called = p >= t
                figures[key].append((called[y].mean() + (~called[~y]).mean() - 1.0, called.mean(), called.mean() > 0.7))
        out["scenarios"][name] = {"logit_mean_sd_shift": [mu, sd, shift], "robust_rules": rules, **{
            key: dict(zip(("true_youden_j", "share_called_positive", "share_of_draws_calling_over_70pct"),
                          (round(float(v), 4) for v in np.mean(np.asarray(vals, dtype=float), axis=0)), strict=True))
            for key, vals in figures.items()}}
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
