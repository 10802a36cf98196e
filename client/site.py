"""Where a site's settings come from, and the digest that names the global weights a round started from.

Deployment: the hospital passes ``--node-config 'data-dir="..." state-dir="..." site-name="..."'``
to its SuperNode. Simulation: Flower fixes node_config to {partition-id, num-partitions}, so
fl-sim writes ``sites.json`` (one entry per simulated hospital) into the folder named by the run
config's ``sim-root`` and each virtual node picks its entry by partition id.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from common.config_fields import ConfigError
from common.devices import torch_device
from common.site_config import SiteConfig

SITES_FILE = "sites.json"


def site_config(node_config: Mapping[str, Any], run_config: Mapping[str, Any]) -> SiteConfig:
    """The site's settings: node_config in deployment, ``sim-root``/sites.json in simulation."""
    if "data-dir" in node_config:
        return SiteConfig.from_mapping(dict(node_config))
    sim_root = str(run_config.get("sim-root", ""))
    if "partition-id" in node_config and sim_root:
        entries = json.loads((Path(sim_root) / SITES_FILE).read_text())
        pid = int(node_config["partition-id"])
        if pid >= len(entries):
            raise ConfigError("site config", [f"partition-id {pid} has no entry in {sim_root}/{SITES_FILE}"])
        return SiteConfig.from_mapping(entries[pid])
    raise ConfigError(
        "site config",
        ["no `data-dir` in node config: start the SuperNode with --node-config "
         "'data-dir=\"/path\" state-dir=\"/path\" site-name=\"NAME\"' (fl-client start does this)"],
    )


def resolve_device(name: str) -> torch.device:
    """auto: CUDA when present, else CPU; cuda without a GPU: the CPU and one warning (common/devices.py)."""
    return torch_device(name)


def weights_digest(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 (64 hex) over the incoming global weights: which model a round started from.

    Every key, dtype and shape is length-prefixed before the bytes, so no two different weight sets
    share one stream. Stored replies and ledger entries use the whole digest (client/replies.py).
    """
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        data = t.numpy().tobytes()
        for part in (key.encode(), str(t.dtype).encode(), repr(tuple(t.shape)).encode()):
            h.update(len(part).to_bytes(8, "big") + part)
        h.update(len(data).to_bytes(8, "big"))
        h.update(data)
    return h.hexdigest()
