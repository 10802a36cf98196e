"""Coordination overhead of a federated round: round wall time against the sites' own training.

    python benchmarks/round_overhead.py                                  # demo: 3 synthetic sites
    python benchmarks/round_overhead.py --data runs/k5/hospitals --state-dir /tmp/k5-state   # study size

Runs `fl-sim run` (DP on, the default ScatterNet model unless --models says otherwise) and reads
each round's record from metrics.json: the round's wall time (train + evaluate + checkpoint, as the
ServerApp measured it) and each site's own training seconds. By default the sites train one at a
time (``--cpus-per-site`` = all cores, so Ray runs one site actor at a time): then every second of
a round that is not a site's training is coordination or per-message set-up, and

    coordination share = 1 - sum of the sites' training seconds / round wall seconds

is exact (the issue's measure). ``overhead_vs_slowest`` (1 - slowest site / round) is kept for
comparison with earlier runs. Round 1 includes decoding the images and computing the fixed
features into the site caches unless ``--state-dir`` points at caches warmed by an earlier run
(then the sites' budgets must allow another run: ``--max-epsilon``). ``steady`` averages rounds >= 2.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _rounds(metrics: Path) -> list[dict[str, float]]:
    out = []
    for r in json.loads(metrics.read_text())["rounds"]:
        train = [s.get("train_seconds") or 0.0 for s in r["sites"].values()]
        wall = float(r["seconds"])
        out.append({
            "round": r["round"], "round_s": round(wall, 2), "sum_site_train_s": round(sum(train), 2),
            "slowest_site_train_s": round(max(train, default=0.0), 2),
            "coordination_s": round(wall - sum(train), 2), "coordination_share": round(1 - sum(train) / wall, 3),
            "overhead_vs_slowest": round(1 - max(train, default=0.0) / wall, 3),
        })
    return out


def _steady(rounds: list[dict[str, float]]) -> dict[str, float]:
    later = [r for r in rounds if r["round"] >= 2] or rounds
    n = len(later)
    wall = sum(r["round_s"] for r in later) / n
    train = sum(r["sum_site_train_s"] for r in later) / n
    return {"rounds": n, "round_s": round(wall, 2), "sum_site_train_s": round(train, 2),
            "coordination_s": round(wall - train, 2), "coordination_share": round(1 - train / wall, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["scatternet"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--sites", type=int, default=3, help="synthetic hospitals made for the run (without --data)")
    ap.add_argument("--patients", type=int, default=30, help="synthetic: mean patients per hospital")
    ap.add_argument("--data", help="hospital folders (e.g. 5 Kermany hospitals made by fl-sim) instead of synthetic ones")
    ap.add_argument("--state-dir", help="the sites' state dirs (reuse warmed caches); default: fresh per run")
    ap.add_argument("--max-epsilon", type=float, default=1000.0, help="each simulated site's budget (benchmark only)")
    ap.add_argument("--cpus-per-site", type=float, default=float(os.cpu_count() or 2),
                    help="Ray CPUs per site actor (default: all cores, one site at a time)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="passed to fl-sim run")
    args = ap.parse_args()
    fl_sim = str(Path(sys.executable).parent / "fl-sim")
    out: dict[str, object] = {"data": args.data or f"{args.sites} synthetic sites, {args.patients} patients each",
                              "rounds": args.rounds, "size": args.size, "cpus": os.cpu_count(),
                              "cpus_per_site": args.cpus_per_site, "load_avg_1m": round(os.getloadavg()[0], 2),
                              "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            cmd = [fl_sim, "run", "--out", tmp, "--name", model, "--model", model, "--rounds", str(args.rounds),
                   "--image-size", str(args.size), "--cpus-per-site", str(args.cpus_per_site),
                   "--max-epsilon", str(args.max_epsilon)]
            cmd += ["--data", args.data] if args.data else ["--sites", str(args.sites), "--patients", str(args.patients)]
            if args.state_dir:
                cmd += ["--state-dir", str(Path(args.state_dir) / model)]
            for item in args.set:
                cmd += ["--set", item]
            started = time.monotonic()
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            rounds = _rounds(Path(tmp) / model / "run" / "metrics.json")
            out["models"][model] = {"command_s": round(time.monotonic() - started, 1),  # type: ignore[index]
                                    "steady": _steady(rounds), "per_round": rounds}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
