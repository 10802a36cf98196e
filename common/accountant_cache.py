"""The accountant's slow, pure results kept in a site's state dir, so a new process does not redo them.

Deployment starts a new process for every Flower message, and planning a round's DP-SGD searches
for the noise multiplier that meets the run's target epsilon (about 13 RDP evaluations, 0.5-3 s on
a 2-core CPU); the ledger then evaluates the RDP curve of every (noise, sample rate) pair it holds.
Both are pure functions of their inputs, so ``<state-dir>/accountant_cache.json`` keeps:

* ``noise``: the noise multiplier found for (target epsilon, delta, sample rate, total steps,
  accountant, search tolerance). The key holds *everything* that determines the noise, so a run
  config that changes any of it (a coordinator asking for less noise) finds no entry and searches
  again; and :func:`common.privacy.plan_dp` re-checks that a cached noise still spends at most the
  target before using it. The site charges its ledger every round as before: the cache only saves
  the search, never a charge.
* ``rdp``: the RDP curve of one subsampled-Gaussian step for (noise, sample rate) at the orders used.

Entries are keyed on the opacus version and the RDP orders too; a file from another version, or
one that cannot be read, is simply ignored (and rewritten). Writes are atomic (temp file + rename).
"""

from __future__ import annotations

import functools
import json
import logging
import math
from importlib import metadata
from pathlib import Path
from typing import Any

from common.cache import atomic_write_bytes

log = logging.getLogger(__name__)

FILENAME = "accountant_cache.json"
VERSION = 1


@functools.lru_cache(maxsize=1)
def _opacus_version() -> str:
    try:
        return metadata.version("opacus")
    except metadata.PackageNotFoundError:  # pragma: no cover - opacus is a dependency
        return "unknown"


def _key(*parts: Any) -> str:
    return json.dumps(parts, separators=(",", ":"))  # floats as repr: exact round trip


class AccountantCache:
    """``accountant_cache.json`` under a site's state dir (see the module docstring)."""

    def __init__(self, state_dir: str | Path, orders: list[float]) -> None:
        self.path = Path(state_dir) / FILENAME
        self._stamp = {"version": VERSION, "opacus": _opacus_version(), "orders": _key(*orders)}
        self._n_orders = len(orders)
        self._doc = self._load()
        self._dirty = False

    def _load(self) -> dict[str, Any]:
        try:
            doc = json.loads(self.path.read_text())
            if all(doc.get(k) == v for k, v in self._stamp.items()):
                return {**self._stamp, "noise": dict(doc["noise"]), "rdp": dict(doc["rdp"])}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pass
        return {**self._stamp, "noise": {}, "rdp": {}}

    def noise(self, target_epsilon: float, delta: float, sample_rate: float, total_steps: int, accountant: str,
              tolerance: float) -> float | None:
        value = self._doc["noise"].get(_key(target_epsilon, delta, sample_rate, total_steps, accountant, tolerance))
        ok = isinstance(value, float) and math.isfinite(value) and value > 0
        return value if ok else None

    def put_noise(self, target_epsilon: float, delta: float, sample_rate: float, total_steps: int, accountant: str,
                  tolerance: float, sigma: float) -> None:
        self._doc["noise"][_key(target_epsilon, delta, sample_rate, total_steps, accountant, tolerance)] = float(sigma)
        self._dirty = True

    def rdp(self, noise_multiplier: float, sample_rate: float) -> tuple[float, ...] | None:
        curve = self._doc["rdp"].get(_key(noise_multiplier, sample_rate))
        if (isinstance(curve, list) and len(curve) == self._n_orders
                and all(isinstance(x, float) and not math.isnan(x) and x >= 0 for x in curve)):
            return tuple(curve)
        return None

    def put_rdp(self, noise_multiplier: float, sample_rate: float, curve: tuple[float, ...]) -> None:
        self._doc["rdp"][_key(noise_multiplier, sample_rate)] = [float(x) for x in curve]
        self._dirty = True

    def save(self) -> None:
        """Write new entries (merged with what another process wrote meanwhile); a no-op when nothing is new."""
        if not self._dirty:
            return
        on_disk = self._load()
        doc = {**self._stamp, "noise": {**on_disk["noise"], **self._doc["noise"]},
               "rdp": {**on_disk["rdp"], **self._doc["rdp"]}}
        try:
            atomic_write_bytes(self.path, json.dumps(doc).encode())
        except OSError as err:  # a cache: a read-only state dir only costs time
            log.debug("accountant cache not written (%s)", err)
            return
        self._doc, self._dirty = doc, False
