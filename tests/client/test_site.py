"""client/site.py: where a site's settings come from and the weights digest."""

from __future__ import annotations

import json

import pytest
import torch

from client.site import site_config, weights_digest
from common.config_fields import ConfigError


def test_site_config_from_node_config_or_sites_json(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    deployed = site_config({"data-dir": str(data), "state-dir": str(tmp_path / "s"), "site-name": "st-mary"}, {})
    assert deployed.site_name == "st-mary" and deployed.max_epsilon == 10.0
    (tmp_path / "sites.json").write_text(json.dumps([{"data-dir": str(data), "state-dir": str(tmp_path / "s1"),
                                                       "site-name": "sim-a", "max-epsilon": 3.0}]))
    simulated = site_config({"partition-id": 0, "num-partitions": 1}, {"sim-root": str(tmp_path)})
    assert simulated.site_name == "sim-a" and simulated.max_epsilon == 3.0
    with pytest.raises(ConfigError, match="partition-id 1 has no entry"):
        site_config({"partition-id": 1, "num-partitions": 2}, {"sim-root": str(tmp_path)})
    with pytest.raises(ConfigError, match="--node-config"):
        site_config({}, {})


def test_weights_digest_changes_with_any_weight():
    w = {"a": torch.zeros(3), "b": torch.ones(2)}
    same = {"b": torch.ones(2), "a": torch.zeros(3)}
    other = {"a": torch.zeros(3), "b": torch.tensor([1.0, 1.0 + 1e-6])}
    assert weights_digest(w) == weights_digest(same) != weights_digest(other)


def test_weights_digest_is_the_full_sha256_and_covers_shapes():
    flat, square = {"a": torch.zeros(4)}, {"a": torch.zeros(2, 2)}
    assert weights_digest(flat) != weights_digest(square)  # same bytes, another model
    assert len(weights_digest(flat)) == 64
