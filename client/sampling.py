"""A DP round's sampling rate, fixed by the run config or by the size the site declares, never by a count.

The coordinator chooses the run's task, labels and label column: filters over the site's images.
Were the sampling rate ``batch-size / n_train`` (or a rate rounded through ``n_train``), the
rate, the steps, the noise multiplier and both epsilons in the reply would give away the exact
number of images the filter selected (per class, per sex, ...). So under DP the site plans with

* ``sample-rate`` when the run sets one: exactly that rate, whatever the site's size;
* otherwise ``batch-size / declared-images``: the size the site declares in its node config (a
  figure the hospital chose, not counted from the run's data). A site that declares none
  refuses batch-size sampling under DP (the text depends on its settings only).

and trains with batches of ``floor(rate * n_train)`` images per Poisson step: Opacus then samples
at ``1 / ceil(n_train / batch)``, which is never above the planned rate, so the ledger's charge is
never below what the training spends. A split too small for even one image per expected batch
cannot train at that rate: :func:`loader_batch` returns 0 and the round is refused with the text
every data-dependent refusal shares (client/round.py).
"""

from __future__ import annotations

import math

from common.config import RunConfig
from common.site_config import SiteConfig


class SamplingRefused(ValueError):  # noqa: N818 - a refusal is an answer, not a crash
    """The run's sampling cannot be planned without the site's size; the message depends on settings only."""


def planned_rate(run: RunConfig, site: SiteConfig) -> float:
    """The Poisson sampling rate a DP round of this run plans with at this site (see the module docstring)."""
    if run.sample_rate > 0:
        return float(run.sample_rate)
    if site.declared_images <= 0:
        raise SamplingRefused(
            "the run samples by `batch-size` (sample-rate = 0), which under DP this site plans from the size it "
            "declares, and it declares none: set node config declared-images, or run with a sample-rate")
    if run.batch_size > site.declared_images:
        raise SamplingRefused(f"`batch-size` = {run.batch_size} is above the {site.declared_images} images this site "
                              "declares (node config declared-images)")
    return run.batch_size / site.declared_images


def loader_batch(rate: float, n_train: int) -> int:
    """Images per batch of the training loader at ``rate`` (0: fewer than one image per expected batch)."""
    return max(0, math.floor(rate * n_train + 1e-9))

