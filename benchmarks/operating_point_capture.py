"""Capture the exact scores an operating-point replay needs from one finished ``fl-sim`` run, as JSON.

    nice -n 10 .venv/bin/python benchmarks/operating_point_capture.py runs/kermany-eps3 \
        > benchmarks/data/operating_point_kermany.json

A simulation holds every site's data, so it can do what no coordinator can: score the exported
round's model on each site's validation split exactly (read as the site reads it: its salt, its
split, its cache) and on the held-out patients no site trained or validated on. The raw logits
(before the export's calibration) are written per site and for the hold-out, rounded to 1e-4;
benchmarks/operating_point.py then replays the sites' noised releases from them many times.
Scores of a public image set's images only: no path, no patient.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.config import RunConfig  # noqa: E402
from common.dataset import encode_targets, scan_site, site_salt  # noqa: E402
from common.loaders import load_site  # noqa: E402
from common.models import build_model, split_features  # noqa: E402
from common.site_config import SiteConfig  # noqa: E402
from server.checkpoint import latest_checkpoint, load_best  # noqa: E402


def _logits(model: torch.nn.Module, images: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
        return torch.cat([model(x[i:i + 256])[:, 0] for i in range(0, len(x), 256)]).numpy()


def capture(sim_root: Path) -> dict:
    run_dir = sim_root / "run"
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise SystemExit(f"{run_dir}: no checkpoint; give a finished fl-sim folder")
    run = RunConfig.from_mapping(ckpt.run_config)
    best = load_best(run_dir) if run.export_round == "best" else None
    export_round, weights = (best[0], best[1]) if best is not None else (ckpt.round, ckpt.weights)
    model = build_model(run.model, dp=True, **run.model_kwargs())
    model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in weights.items()})
    model.eval()
    frontend, head, _ = split_features(model)
    sites = {}
    for entry in json.loads((sim_root / "sites.json").read_text()):
        site = SiteConfig.from_mapping(entry)
        data = load_site(site.data_dir, site.state_dir, image_size=run.image_size, task=run.task, labels=run.labels,
                         val_fraction=site.val_fraction)
        if frontend is not None:
            _, val = data.feature_datasets(frontend)
            with torch.no_grad():
                logits = head(val.tensors[0])[:, 0].numpy()
        else:
            logits = _logits(model, data.images[data.split.val])
        sites[site.site_name] = {"y": data.targets.y[data.split.val, 0].astype(int).tolist(),
                                 "logit": np.round(logits.astype(float), 4).tolist()}
    holdout = sim_root / "hospitals" / "holdout"
    index = scan_site(holdout, salt=site_salt(sim_root / "state" / "holdout"), image_size=run.image_size)
    targets = encode_targets(index, run.task, run.labels)
    images = np.stack([index.records[int(i)].pixels for i in targets.keep])
    return {"source": str(sim_root.name), "export_round": export_round, "labels": list(run.labels),
            "sites": sites, "holdout": {"y": targets.y[:, 0].astype(int).tolist(),
                                        "logit": np.round(_logits(model, images).astype(float), 4).tolist()}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sim_root", help="a finished fl-sim folder (runs/<name>)")
    args = ap.parse_args()
    json.dump(capture(Path(args.sim_root).resolve()), sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
