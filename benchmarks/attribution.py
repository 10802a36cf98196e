"""Where does the model look? The share of its attribution inside the lung fields on held-out positives, as JSON.

    nice -n 10 .venv/bin/python benchmarks/attribution.py --study runs/shift --recipes v3,default > attribution.json
    nice -n 10 .venv/bin/python benchmarks/attribution.py --study runs/shift --figure docs/img/attribution.png

Reads the heads the shift benchmark trained (``<study>/shift/models/<recipe>/<arm>-<repeat>.pt``,
benchmarks/shift.py) and the held-out patients' images. For every held-out pneumonia image it
computes the map ``fl-predict`` draws (clinic/heatmap.py, the exact linear-head decomposition:
``M[i, j] = sum_k W[k, i, j] F[k, i, j]`` over the normalised scattering coefficients, one cell per
2^J x 2^J pixels of the model input) and the share of its positive part that falls inside the lung
fields: two boxes, rows 15-85% and columns 12-45% / 55-88% of the image, fixed before any map was
looked at (the corners, the borders, the shoulders and the spine band between the lungs are outside).
Maps are spread over the model's input pixels (each cell over the pixels it covers, as the overlay
does) and the boxes are taken on pixel centres, so heads that read grids of different sizes are
measured over the same region; the boxes hold ``lung_area_share`` of the pixels, the share a map
spread evenly would have. Reported per recipe and arm: the mean share with a 95% bootstrap interval
over the images, and the held-out AUC of the same head, so a rise in share can be read against what
it costs. ``--figure`` draws the mean positive map of each recipe over the positives.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _util import machine_info, print_json, progress  # noqa: E402
from shift import RECIPES, run_config  # noqa: E402
from shift_data import load_shift_data, rendered_features  # noqa: E402

from common.metrics import roc_auc  # noqa: E402
from common.models import build_model, split_features  # noqa: E402

LUNG_ROWS = (0.15, 0.85)
LUNG_COLUMNS = ((0.12, 0.45), (0.55, 0.88))


def lung_mask(h: int, w: int) -> np.ndarray:
    """[h, w] bool: the cells (pixels) whose centre lies in the lung fields."""
    rows = (np.arange(h) + 0.5) / h
    cols = (np.arange(w) + 0.5) / w
    in_rows = (rows >= LUNG_ROWS[0]) & (rows <= LUNG_ROWS[1])
    in_cols = np.zeros(w, bool)
    for lo, hi in LUNG_COLUMNS:
        in_cols |= (cols >= lo) & (cols <= hi)
    return in_rows[:, None] & in_cols[None, :]


def attribution_maps(head: torch.nn.Module, feats: np.ndarray, batch: int = 128) -> np.ndarray:
    """[N, h, w] logit maps of the first output, exactly as clinic/heatmap.py decomposes a linear head."""
    weight = head.classifier.weight.detach()[0]
    out = []
    with torch.no_grad():
        for s in range(0, len(feats), batch):
            normed, _ = head.normed(torch.from_numpy(np.asarray(feats[s:s + batch], dtype=np.float32)))
            out.append((normed * weight.view(normed.shape[1:])).sum(dim=1).numpy())
    return np.concatenate(out)


def lung_share(maps: np.ndarray, size: int) -> np.ndarray:
    """Share of each map's positive part inside the lung fields, over the model's ``size`` x ``size`` input pixels."""
    block = size // maps.shape[1]
    positive = np.kron(np.clip(maps, 0.0, None), np.ones((1, block, block))) / (block * block)
    mask = lung_mask(size, size)
    total = positive.sum(axis=(1, 2))
    return np.where(total > 0, (positive * mask).sum(axis=(1, 2)) / np.maximum(total, 1e-12), np.nan)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--study", default="runs/shift")
    p.add_argument("--data", default=os.path.join(os.environ.get("FEDXRAY_DATA", "../shared/data"), "kermany-pneumonia"))
    p.add_argument("--recipes", default="v3,default")
    p.add_argument("--arms", default="fedavg-eps3,pooled")
    p.add_argument("--set", action="append", default=[], metavar="RECIPE:KEY=VALUE", help="as benchmarks/shift.py")
    p.add_argument("--figure", help="write the mean positive maps as a PNG here")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    overrides: dict[str, dict[str, Any]] = {}
    for item in args.set:
        name, _, kv = item.partition(":")
        key, _, value = kv.partition("=")
        overrides.setdefault(name, {})[key] = float(value) if value[:1] in "0123456789" else value
    data = load_shift_data(Path(args.study), Path(args.data), say=progress)
    rng = np.random.default_rng(0)
    results: dict[str, Any] = {}
    mean_maps: dict[str, np.ndarray] = {}
    for recipe in args.recipes.split(","):
        settings = {**RECIPES.get(recipe, {}), **overrides.get(recipe, {})}
        run = run_config(settings, dp=True, epsilon=3.0, task="binary", labels=(data.positive,), rounds=8)
        frontend, head, _ = split_features(build_model(run.model, dp=True, **run.model_kwargs()))
        feats = rendered_features(data, frontend, "test", task="binary")
        y, clean = feats["__y__"], feats["clean"]
        for arm in args.arms.split(","):
            paths = sorted((data.work / "models" / recipe).glob(f"{arm}-*.pt"))
            if not paths:
                progress(f"{recipe} / {arm}: no trained head under {data.work / 'models' / recipe} (run benchmarks/shift.py)")
                continue
            shares, aucs, maps_sum = [], [], None
            for path in paths:
                head.load_state_dict(torch.load(path, weights_only=True))
                maps = attribution_maps(head, clean)
                share = lung_share(maps[y == 1], run.image_size)
                shares.append(share)
                aucs.append(float(roc_auc(y, maps.sum(axis=(1, 2)))))  # the logit minus the bias: same ranking
                positive = np.clip(maps[y == 1], 0, None).mean(axis=0)
                maps_sum = positive if maps_sum is None else maps_sum + positive
            all_shares = np.concatenate(shares)
            all_shares = all_shares[~np.isnan(all_shares)]
            boot = [float(rng.choice(all_shares, len(all_shares)).mean()) for _ in range(1000)]
            results.setdefault(recipe, {})[arm] = {
                "heads": len(paths), "positives": int((y == 1).sum()), "lung_share": float(all_shares.mean()),
                "lung_share_ci": [float(v) for v in np.quantile(boot, [0.025, 0.975])],
                "lung_area_share": float(lung_mask(run.image_size, run.image_size).mean()), "auc": float(np.mean(aucs))}
            mean_maps[f"{recipe} / {arm}"] = maps_sum / len(paths)  # type: ignore[operator]
            progress(f"{recipe} / {arm}: lung share {results[recipe][arm]['lung_share']:.3f}, AUC {np.mean(aucs):.4f}")
    if args.figure and mean_maps:
        _figure(Path(args.figure), mean_maps)
    print_json({"benchmark": "attribution", "lung_rows": LUNG_ROWS, "lung_columns": LUNG_COLUMNS, "results": results,
                "machine": machine_info()})
    return 0


def _figure(path: Path, maps: dict[str, np.ndarray]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(maps), figsize=(3.2 * len(maps), 3.4))
    for ax, (name, m) in zip(np.atleast_1d(axes), maps.items(), strict=True):
        ax.imshow(m / max(float(m.max()), 1e-12), cmap="magma", vmin=0, vmax=1, extent=(0, 1, 1, 0))
        for lo, hi in LUNG_COLUMNS:
            ax.add_patch(plt.Rectangle((lo, LUNG_ROWS[0]), hi - lo, LUNG_ROWS[1] - LUNG_ROWS[0], fill=False,
                                       edgecolor="cyan", linewidth=1.2))
        ax.set_title(name, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("mean positive attribution on held-out pneumonia images (cyan: lung fields)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
