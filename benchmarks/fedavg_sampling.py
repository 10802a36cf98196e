"""FedAvg with DP on the study's hospitals: held-out AUC by sample rate (and other run settings), as JSON.

    .venv/bin/python benchmarks/fedavg_sampling.py --study runs/study-v2 --epsilon 3 --sample-rates 0.2,0.5,1.0 --repeats 5
    .venv/bin/python benchmarks/fedavg_sampling.py --study runs/study-v2 --epsilon 1 --sample-rates 1.0 --set max-grad-norm=0.05

Needs a study folder made by ``fl-sim study`` (its hospitals/ and the sites' feature caches are reused).
Each repeat runs ``--rounds`` rounds in one process: every hospital trains from the round's global
weights with ``client.train.train_one_round`` at its own DP plan (``common.privacy.plan_dp`` for
the target epsilon, as the ClientApp plans it), the updates are averaged weighted by training
images (FedAvg), and the last round's model is scored on the study's held-out patients. Flower,
the evaluation noise and the ledger are left out: this isolates the training recipe. Sampling and
DP noise come from the OS (as at a site), so repeats differ; the JSON gives every repeat and the mean.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from client.round import train_settings  # noqa: E402
from client.train import predict, train_one_round  # noqa: E402
from common.cli import parse_settings  # noqa: E402
from common.config import RunConfig  # noqa: E402
from common.metrics import roc_auc  # noqa: E402
from common.models import build_model, split_features  # noqa: E402
from common.privacy import plan_dp  # noqa: E402
from simulations.study import StudySettings  # noqa: E402
from simulations.study_arms import Arm, arm_run_config  # noqa: E402
from simulations.study_data import read_sites  # noqa: E402


def _tensors(x: np.ndarray, y: np.ndarray) -> torch.utils.data.TensorDataset:
    return torch.utils.data.TensorDataset(torch.from_numpy(np.ascontiguousarray(x)),
                                          torch.from_numpy(y.astype(np.float32)[:, None]))


def fedavg_auc(run: RunConfig, sites: dict[str, tuple], head: torch.nn.Module, test: tuple, epsilon: float) -> float:
    """One federated run in this process; the held-out AUC of its last round."""
    state = {k: v.clone() for k, v in head.state_dict().items()}
    for r in range(1, run.num_server_rounds + 1):
        total, acc = 0, None
        for data, n in sites.values():
            rate, batch = run.sampling(n)
            plan = plan_dp(n_train=n, batch_size=batch, local_epochs=run.epochs_per_round(rate), rounds=run.num_server_rounds,
                           delta=run.delta, max_grad_norm=run.max_grad_norm, target_epsilon=epsilon)
            settings = replace(train_settings(run, n, r, 0.0), noise_multiplier=plan.noise_multiplier, steps=plan.steps_per_round)
            model = copy.deepcopy(head)
            model.load_state_dict(state)
            weights, _ = train_one_round(model, data, settings, device=torch.device("cpu"))
            acc = {k: v * n for k, v in weights.items()} if acc is None else {k: acc[k] + weights[k] * n for k in acc}
            total += n
        state = {k: v / total for k, v in acc.items()}
    model = copy.deepcopy(head)
    model.load_state_dict(state)
    probs, _ = predict(model, test[0], device=torch.device("cpu"), batch_size=512)
    return roc_auc(test[1], probs[:, 0])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--study", default="runs/study", help="a folder made by `fl-sim study` (hospitals/, state/)")
    p.add_argument("--epsilon", type=float, default=3.0, help="target epsilon per site")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--sample-rates", default="0.2,1.0", help="comma-separated sample rates to compare")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="other run settings (kebab-case)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.study)
    manifest = json.loads((out / "hospitals" / "manifest.json").read_text())
    s = replace(StudySettings(), rounds=args.rounds)
    data = read_sites(out, s, manifest, lambda line: print(line, file=sys.stderr))
    base = arm_run_config(s, Arm(name="bench", kind="federated", dp=True, epsilon=args.epsilon), data.positive)
    extra = parse_settings(args.set)
    head_model = build_model(base.model, dp=True, **base.model_kwargs())
    frontend, head, _ = split_features(head_model)
    test = (_tensors(data.test.features(frontend), data.test.targets.y[:, 0]), data.test.targets.y[:, 0])
    sites = {}
    for name in data.sites:
        x, y = data.arrays([name], "train", frontend)
        sites[name] = (_tensors(x, y), len(y))
    results = []
    for rate in (float(r) for r in args.sample_rates.split(",")):
        run = RunConfig.from_mapping({**base.to_mapping(), **extra, "sample-rate": rate})
        t0 = time.perf_counter()
        aucs = []
        for i in range(args.repeats):
            aucs.append(fedavg_auc(run, sites, head, test, args.epsilon))
            print(f"sample rate {rate:g}, repeat {i + 1}/{args.repeats}: held-out AUC {aucs[-1]:.4f}", file=sys.stderr)
        results.append({"sample_rate": rate, "auc": aucs, "mean_auc": float(np.mean(aucs)),
                        "seconds_per_run": (time.perf_counter() - t0) / args.repeats})
    print(json.dumps({"epsilon": args.epsilon, "rounds": args.rounds, "settings": extra,
                      "sites": {k: v[1] for k, v in sites.items()}, "test_images": int(len(test[1])),
                      "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
