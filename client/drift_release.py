"""The drift reference's release: noised statistics of a site's validation images, charged like an evaluation.

The coordinator asks for it with the last round's evaluation (``reference-stats``); the sums become the
exported model's drift reference (common/reference.py, docs/clinic.md). One image moves one count in
each of the statistics' histograms, so the Gaussian noise is the site's ``eval-noise`` and the
ledger records the release (kind ``reference``) against every validation patient before anything is drawn.
"""

from __future__ import annotations

import logging
import secrets

import numpy as np

from client.ledger import BudgetExceeded, PrivacyLedger, dataset_fingerprint
from common import reference
from common.loaders import SiteData
from common.site_config import SiteConfig

log = logging.getLogger(__name__)


def drift_release(site: SiteConfig, data: SiteData, ledger: PrivacyLedger, run_id: str,
                  server_round: int) -> dict[str, list[float]]:
    """Noised statistics of the validation images for the drift reference, charged like an evaluation."""
    noise = site.eval_noise / reference.IMAGE_COUNTS_SENSITIVITY
    try:
        ledger.reserve(run_id=run_id + "-reference", round=server_round,
                       fingerprint=dataset_fingerprint(data.val_hashes()), noise_multiplier=noise, sample_rate=1.0,
                       steps=1, max_grad_norm=1.0, n_train=max(1, data.n_val), delta=site.delta,
                       patients=data.patients("val"), kind="reference")
    except BudgetExceeded:
        log.warning("no drift reference statistics this run: they would pass max-epsilon")
        return {}
    images = (data.images[data.split.val].astype(np.float32) / 255.0)
    counts = reference.noised_image_counts(images, site.eval_noise, np.random.default_rng(secrets.randbits(128)))
    return {f"ref-{name}": values for name, values in counts.items()}
