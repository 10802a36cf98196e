"""client/site.py: where a site's settings come from, the weights digest and the reply cache."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch

from client.site import ReplyCache, site_config, weights_digest
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


def test_reply_cache_keeps_what_a_retry_needs_and_prunes_the_rest(tmp_path):
    cache = ReplyCache(tmp_path, "run-x")
    for r in range(1, 6):
        cache.put(r, str(r) * 64, {"weights": {"w": torch.full((2,), float(r))}, "metrics": {"round": r}})
    kept = sorted(p.name.split("-")[1] for p in (tmp_path / "replies" / "run-x").glob("*.pt"))
    assert kept == ["00004", "00005"]  # the latest round and the one before it (a resume may retry it)
    assert cache.get(5, "5" * 64)["metrics"]["round"] == 5 and cache.get(1, "1" * 64) is None
    assert oct((tmp_path / "replies" / "run-x" / f"round-00005-{'5' * 16}.pt").stat().st_mode & 0o777) == "0o600"
    old = ReplyCache(tmp_path, "old-run")
    old.put(1, "f" * 64, {"weights": {}, "metrics": {}})
    stale = time.time() - 40 * 86400
    for p in [*(tmp_path / "replies" / "old-run").iterdir(), tmp_path / "replies" / "old-run"]:
        os.utime(p, (stale, stale))
    cache.put(6, "6" * 64, {"weights": {}, "metrics": {}})
    assert not (tmp_path / "replies" / "old-run").exists()  # another run, untouched for 40 days
