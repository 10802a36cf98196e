"""What a simulation can measure and a real coordinator cannot: exact validation figures.

In a federation the coordinator sees each site's validation scores only as noised histograms
(docs/privacy.md): its pooled AUC is a noisy, downward-biased estimate, and the noise is the
price of the sites' privacy. A simulation holds every site's data on one machine, so after the
run it can score the global model on the sites' validation splits exactly (read the way the
sites read them, with their own salts and split), and on a hold-out set no site trained or
validated on. fl-sim prints both beside the coordinator's figures.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.config import RunConfig
from common.loaders import load_site
from common.metrics import roc_auc
from common.models import build_model, split_features
from common.site_config import SiteConfig
from server.checkpoint import latest_checkpoint, load_best
from server.ema import exported_weights


def exact_validation_auc(sim_root: Path, run_dir: Path) -> dict[str, Any]:
    """Pooled validation AUC, exact, of the last round's model and of the exported (best) round's model."""
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        return {}
    run = RunConfig.from_mapping(ckpt.run_config)
    if run.task != "binary":
        return {}  # per-class figures come from the coordinator's pooled histograms (metrics.json)
    models = {"last": (ckpt.round, exported_weights(ckpt.strategy_state, ckpt.weights))}  # the weight average when on
    best = load_best(run_dir) if run.export_round == "best" else None
    if best is not None:
        models["exported"] = (best[0], best[1])
    scores: dict[str, list[np.ndarray]] = {name: [] for name in models}
    labels: list[np.ndarray] = []
    built = {}  # one model per round scored, not one per site: 1,000 sites would build 2,000
    for name, (_, weights) in models.items():
        model = build_model(run.model, dp=True, **run.model_kwargs())
        model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in weights.items()})
        built[name] = model.eval()
    entries = json.loads((sim_root / "sites.json").read_text())
    loaders_log = logging.getLogger("common.loaders")
    level = loaders_log.level
    loaders_log.setLevel(logging.ERROR)  # each site already logged its skipped files; 1,000 sites: 1,000 lines
    try:
        return _score(run, models, built, [SiteConfig.from_mapping(e) for e in entries], scores, labels)
    finally:
        loaders_log.setLevel(level)


def _score(run: RunConfig, models: dict[str, Any], built: dict[str, torch.nn.Module], sites: list[SiteConfig],
           scores: dict[str, list[np.ndarray]], labels: list[np.ndarray]) -> dict[str, Any]:
    """Every site's validation split scored by each model (read as the site reads it), then pooled."""
    for site in sites:
        data = load_site(site.data_dir, site.state_dir, image_size=run.image_size, task=run.task, labels=run.labels,
                         val_fraction=site.val_fraction)
        if data.n_val == 0 or run.task != "binary":
            continue
        for name, model in built.items():
            frontend, head, _ = split_features(model)
            with torch.no_grad():
                if frontend is not None:
                    _, val = data.feature_datasets(frontend)
                    logits = head(val.tensors[0])
                else:
                    x = torch.from_numpy(data.images[data.split.val]).float().div_(255.0).unsqueeze(1)
                    logits = model(x)
            scores[name].append(torch.sigmoid(logits[:, 0]).numpy())
        labels.append(data.targets.y[data.split.val, 0])
    if not labels:
        return {}
    y = np.concatenate(labels)
    out: dict[str, Any] = {"images": int(y.size)}
    for name, (round_, _) in models.items():
        out[name] = {"round": round_, "auc": float(roc_auc(y, np.concatenate(scores[name])))}
    return out
