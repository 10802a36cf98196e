"""client/sampling.py: the DP sampling rate comes from the run or the site's declared size, never a count."""

from __future__ import annotations

import math

import pytest

from client.sampling import SamplingRefused, loader_batch, planned_rate
from common.config import RunConfig
from common.site_config import SiteConfig


def _site(tmp_path, **kw) -> SiteConfig:
    return SiteConfig.from_mapping({"data-dir": str(tmp_path), "state-dir": str(tmp_path / "s"), "site-name": "a", **kw})


def test_the_rate_is_the_runs_or_batch_over_the_declared_size(tmp_path):
    assert planned_rate(RunConfig.from_mapping({"sample-rate": 0.2}), _site(tmp_path)) == 0.2
    batch = RunConfig.from_mapping({"sample-rate": 0.0, "batch-size": 32})
    assert planned_rate(batch, _site(tmp_path, **{"declared-images": 800})) == 0.04
    with pytest.raises(SamplingRefused, match="declared-images"):
        planned_rate(batch, _site(tmp_path))
    with pytest.raises(SamplingRefused, match="above the 16 images"):
        planned_rate(batch, _site(tmp_path, **{"declared-images": 16}))


@pytest.mark.parametrize("rate", [1.0, 0.49, 0.3, 0.2, 0.05, 0.013])
def test_opacus_never_samples_above_the_planned_rate(rate):
    for n in range(1, 400):
        batch = loader_batch(rate, n)
        if batch == 0:
            assert rate * n < 1
            continue
        assert 1 / math.ceil(n / batch) <= rate + 1e-12, (rate, n, batch)  # Opacus' rate: 1 / len(loader)

