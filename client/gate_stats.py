"""What a site releases for the intended-use gate's image check (common/ood.py), charged like an evaluation.

Two releases per run, both on the site's validation images and charged to its validation patients
(the training patients' epsilon stays exactly what DP-SGD spent), both with the noise multiplier
of the site's evaluation histograms (its ``eval-noise`` over sqrt(2)), so each costs what one
evaluation costs:

1. **Reference sums** (``gate-sum``, ``gate-n``), when the coordinator asks (``gate-stats``) because
   it holds no reference yet: the noised sum of the unit descriptors and the noised count. They
   are drawn once per run and kept in the state dir; a later request in the same run re-sends the
   same numbers (nothing new is released, nothing is charged). If the ledger holds the charge but
   the kept numbers are lost, nothing is sent: fresh noise would be a second, uncharged release.
2. **Score histogram** (``gate-hist``, ``gate-noise``), in the last round (with the drift
   reference) when the coordinator sends the pooled reference (``gate-reference``): the noised
   histogram of the validation images' scores against it (the score also reads each image upside
   down: those descriptors are computed afresh, the cache holds the features of the images as they
   are). Whatever the coordinator sends, one image moves one count by one: a crafted reference
   cannot weaken the noise.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import secrets
from pathlib import Path
from typing import Any

import numpy as np
import torch

from client.ledger import BudgetExceeded, LedgerConflictError, PrivacyLedger, dataset_fingerprint
from common import metrics as metrics_lib
from common.cache import atomic_write_bytes
from common.loaders import SiteData
from common.models import split_features
from common.ood import SUMS_SENSITIVITY, GateReference, OodError, descriptor_for, descriptors, noised_histogram, noised_sums
from common.site_config import SiteConfig

log = logging.getLogger(__name__)

KIND_REFERENCE, KIND_CUTOFF = "gate-reference", "gate-cutoff"  # ledger kinds of the two releases


def noise_multiplier(site: SiteConfig) -> float:
    """The gate's noise multiplier: that of the site's evaluation histograms."""
    return site.eval_noise / metrics_lib.HISTOGRAM_SENSITIVITY


def gate_release(site: SiteConfig, data: SiteData, ledger: PrivacyLedger, model: torch.nn.Module, *, run_name: str,
                 run_id: str, server_round: int, stats: bool, reference: str) -> dict[str, Any]:
    """The gate keys of an evaluate reply (module docstring); {} when nothing is asked or nothing may be sent."""
    out: dict[str, Any] = {}
    try:
        if stats:
            out.update(_reference_sums(site, data, ledger, model, run_name))
        if reference:
            out.update(_score_histogram(site, data, ledger, model, GateReference.from_json(reference), run_id, server_round))
    except OodError as err:
        log.warning("intended-use gate statistics not sent: %s", err)
    return out


def _val_descriptors(data: SiteData, model: torch.nn.Module, *, turned: bool = False) -> np.ndarray:
    """Unit descriptors of the validation images, from the site's cached features where they are the
    descriptor's own, else computed afresh from the cached images (``turned``: the same images upside
    down; a front end that standardises intensities before the scattering: the raw scattering)."""
    descriptor = descriptor_for(model)
    front, _, _ = split_features(model)
    idx = data.split.val
    if front is not None and not turned and descriptor.front_end is front:  # the cached features are the descriptor's
        return descriptors(descriptor, data.features(front)[idx])
    images = torch.from_numpy(data.images[idx].astype(np.float32) / 255.0)[:, None]
    if turned:
        images = torch.flip(images, dims=(2, 3))
    with torch.inference_mode():
        feats = torch.cat([descriptor.front_end(images[i : i + 64]) for i in range(0, len(images), 64)])
    return descriptors(descriptor, feats)


def _kept(site: SiteConfig, run_name: str) -> Path:
    return site.state_dir / "gate" / f"{hashlib.sha256(run_name.encode()).hexdigest()[:24]}.json"


def _charge(site: SiteConfig, data: SiteData, ledger: PrivacyLedger, *, run_id: str, server_round: int, kind: str) -> bool:
    try:
        ledger.reserve(run_id=run_id, round=server_round, fingerprint=dataset_fingerprint(data.val_hashes()),
                       noise_multiplier=noise_multiplier(site), sample_rate=1.0, steps=1, max_grad_norm=1.0,
                       n_train=max(1, data.n_val), delta=site.delta, patients=data.patients("val"), kind=kind)
    except (BudgetExceeded, LedgerConflictError) as err:
        log.warning("no intended-use gate statistics (%s) this run: %s", kind, err)
        return False
    return True


def _reference_sums(site: SiteConfig, data: SiteData, ledger: PrivacyLedger, model: torch.nn.Module,
                    run_name: str) -> dict[str, Any]:
    kept = _kept(site, run_name)
    if kept.is_file():
        return dict(json.loads(kept.read_text()))
    run_id = f"{run_name}@gate"
    if any(c.kind == KIND_REFERENCE and c.run_id == run_id for c in ledger.contributions()):
        log.warning("intended-use gate reference already released in this run but its numbers are lost: not sent again")
        return {}
    if not _charge(site, data, ledger, run_id=run_id, server_round=0, kind=KIND_REFERENCE):
        return {}
    std = noise_multiplier(site) * SUMS_SENSITIVITY
    sums = noised_sums(_val_descriptors(data, model), std, np.random.default_rng(secrets.randbits(128)))
    atomic_write_bytes(kept, json.dumps(sums).encode())
    return sums


def _score_histogram(site: SiteConfig, data: SiteData, ledger: PrivacyLedger, model: torch.nn.Module,
                     reference: GateReference, run_id: str, server_round: int) -> dict[str, Any]:
    grid = descriptor_for(model).grid
    turned = _val_descriptors(data, model, turned=True) if grid else None
    scores = reference.scores(_val_descriptors(data, model), turned, grid=grid)  # OodError: another model's reference
    if not _charge(site, data, ledger, run_id=f"{run_id}-gate", server_round=server_round, kind=KIND_CUTOFF):
        return {}
    std = noise_multiplier(site)
    hist = noised_histogram(np.nan_to_num(scores, nan=math.inf), std, np.random.default_rng(secrets.randbits(128)))
    return {"gate-hist": hist, "gate-noise": float(std)}
