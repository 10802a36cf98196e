"""Where a site's settings come from, and the replay cache that makes retried rounds free.

Deployment: the hospital passes ``--node-config 'data-dir="..." state-dir="..." site-name="..."'``
to its SuperNode. Simulation: Flower fixes node_config to {partition-id, num-partitions}, so
fl-sim writes ``sites.json`` (one entry per simulated hospital) into the folder named by the run
config's ``sim-root`` and each virtual node picks its entry by partition id.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from common.cache import atomic_write_bytes
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
    """sha256 over the incoming global weights: identifies which model a round started from."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(key.encode())
        h.update(str(t.dtype).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


class ReplyCache:
    """Stores each round's reply so a retried round re-sends it instead of training again.

    Training again from the same global weights would release a second noisy update: more
    privacy spent for nothing. Re-sending the stored reply releases nothing new, so a retry
    (coordinator crash, resume, lost reply) costs no epsilon and leaves the ledger unchanged.
    """

    def __init__(self, state_dir: Path, run_name: str) -> None:
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in run_name)
        self.root = Path(state_dir) / "replies" / safe

    def _path(self, server_round: int, digest: str) -> Path:
        return self.root / f"round-{server_round:05d}-{digest[:16]}.pt"

    def get(self, server_round: int, digest: str) -> dict[str, Any] | None:
        path = self._path(server_round, digest)
        if not path.is_file():
            return None
        try:
            return torch.load(path, weights_only=True)
        except (OSError, RuntimeError, EOFError):
            return None

    def put(self, server_round: int, digest: str, reply: dict[str, Any]) -> None:
        buf = io.BytesIO()
        torch.save(reply, buf)
        atomic_write_bytes(self._path(server_round, digest), buf.getvalue())
        os.chmod(self._path(server_round, digest), 0o600)
        self.prune(server_round)

    def prune(self, server_round: int, *, keep_days: float = 30.0) -> int:
        """Drop replies nobody can ask for again; returns how many files went.

        A run only ever retries its latest round (a resumed run continues after its last
        checkpoint), so this run's replies older than the previous round go; other runs' replies
        go once untouched for ``keep_days``. A CNN's reply is about 9 MB: without this, a site's
        disk fills up round by round.
        """
        removed = 0
        for path in self.root.glob("round-*.pt"):
            try:
                if int(path.name.split("-")[1]) < server_round - 1:
                    path.unlink(missing_ok=True)
                    removed += 1
            except (ValueError, IndexError):
                continue
        cutoff = time.time() - keep_days * 86400
        for other in self.root.parent.iterdir() if self.root.parent.is_dir() else ():
            if other == self.root or not other.is_dir():
                continue
            try:
                if other.stat().st_mtime < cutoff and all(p.stat().st_mtime < cutoff for p in other.iterdir()):
                    for p in other.iterdir():
                        p.unlink(missing_ok=True)
                        removed += 1
                    other.rmdir()
            except OSError:
                continue
        return removed
