"""Coordination overhead of a federated round: round wall time against local training time.

    python benchmarks/round_overhead.py [--models mobilenet_v2 densenet121] [--rounds 2] [--size 64]

Runs `fl-sim` (3 synthetic sites, DP on) per model and reads each round's record from
metrics.json: the round's wall time (train + evaluate + checkpoint, as the ServerApp measured it)
and each site's own training seconds. Prints one JSON object with, per round,
overhead_vs_slowest = 1 - slowest site's training / round time (the issue's measure; on a machine
with fewer cores than sites the sites also queue for CPU, so this counts queueing too), and
overhead_vs_serial = 1 - sum of all sites' training / round time (what a fully serial machine
could at best achieve). Round 1 includes decoding the images into the site caches.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["mobilenet_v2", "densenet121"])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--patients", type=int, default=30)
    args = ap.parse_args()
    fl_sim = str(Path(sys.executable).parent / "fl-sim")
    out: dict[str, object] = {"sites": 3, "rounds": args.rounds, "size": args.size, "cpus": os.cpu_count(), "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            cmd = [fl_sim, "run", "--out", tmp, "--name", model, "--model", model, "--rounds", str(args.rounds),
                   "--image-size", str(args.size), "--patients", str(args.patients), "--local-epochs", "1",
                   "--partition", "iid"]
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            rounds = json.loads((Path(tmp) / model / "run" / "metrics.json").read_text())["rounds"]
            per_round = []
            for r in rounds:
                train = [s.get("train_seconds") or 0.0 for s in r["sites"].values()]
                wall = float(r["seconds"])
                per_round.append({
                    "round": r["round"], "round_s": round(wall, 2), "slowest_site_train_s": round(max(train), 2),
                    "sum_site_train_s": round(sum(train), 2),
                    "overhead_vs_slowest": round(1 - max(train) / wall, 3),
                    "overhead_vs_serial": round(1 - sum(train) / wall, 3),
                })
            out["models"][model] = per_round  # type: ignore[index]
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
