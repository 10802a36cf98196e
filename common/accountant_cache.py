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

A cache must never weaken DP, so it is not trusted as it stands on disk:

* the file carries an HMAC-SHA256 of its content under a key only this site's state dir holds
  (``accountant_cache.key``, 32 random bytes, 0600, made at first use). A file edited by hand,
  copied from another site or written by anything but this module fails the check and is
  ignored whole (one warning), so a doctored RDP curve can never lower the epsilon the ledger
  composes;
* :func:`common.privacy.plan_dp` recomputes a cached noise's epsilon with the accountant itself
  (one RDP curve, never the cached one) before it uses it.

The key protects against edits by anyone who cannot read the state dir's key; whoever can read it
can also edit the ledger beside it (docs/privacy.md, "The ledger trusts the site").
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import logging
import math
import os
import secrets
from importlib import metadata
from pathlib import Path
from typing import Any

from common.cache import atomic_write_bytes

log = logging.getLogger(__name__)

FILENAME = "accountant_cache.json"
KEY_FILENAME = "accountant_cache.key"
VERSION = 2


@functools.lru_cache(maxsize=1)
def _opacus_version() -> str:
    try:
        return metadata.version("opacus")
    except metadata.PackageNotFoundError:  # pragma: no cover - opacus is a dependency
        return "unknown"


def _key(*parts: Any) -> str:
    return json.dumps(parts, separators=(",", ":"))  # floats as repr: exact round trip


def _site_key(state_dir: Path) -> bytes | None:
    """The state dir's signing key, made (0600) at first use; None when it can be neither read nor made."""
    path = state_dir / KEY_FILENAME
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        pass
    except OSError as err:
        log.debug("accountant cache key not made (%s): the cache is off", err)
        return None
    else:
        try:
            os.write(fd, secrets.token_bytes(32))
            os.fsync(fd)
        finally:
            os.close(fd)
    try:
        key = path.read_bytes()
    except OSError:
        return None
    return key if len(key) == 32 else None


def _mac(key: bytes, doc: dict[str, Any]) -> str:
    body = json.dumps({k: v for k, v in doc.items() if k != "mac"}, sort_keys=True, separators=(",", ":"))
    return hmac.new(key, body.encode(), hashlib.sha256).hexdigest()


class AccountantCache:
    """``accountant_cache.json`` under a site's state dir (see the module docstring)."""

    def __init__(self, state_dir: str | Path, orders: list[float]) -> None:
        self.path = Path(state_dir) / FILENAME
        self._secret = _site_key(Path(state_dir)) if Path(state_dir).is_dir() else None
        self._stamp = {"version": VERSION, "opacus": _opacus_version(), "orders": _key(*orders)}
        self._n_orders = len(orders)
        self._doc = self._load()
        self._dirty = False

    def _load(self) -> dict[str, Any]:
        empty = {**self._stamp, "noise": {}, "rdp": {}}
        if self._secret is None:
            return empty
        try:
            doc = json.loads(self.path.read_text())
            if not all(doc.get(k) == v for k, v in self._stamp.items()):
                return empty
            if not hmac.compare_digest(str(doc.get("mac", "")), _mac(self._secret, doc)):
                log.warning("%s is not signed by this site's key (edited, copied or damaged): ignored and rewritten",
                            self.path)
                return empty
            return {**self._stamp, "noise": dict(doc["noise"]), "rdp": dict(doc["rdp"])}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return empty

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
        if not self._dirty or self._secret is None:
            return
        on_disk = self._load()
        doc = {**self._stamp, "noise": {**on_disk["noise"], **self._doc["noise"]},
               "rdp": {**on_disk["rdp"], **self._doc["rdp"]}}
        try:
            atomic_write_bytes(self.path, json.dumps({**doc, "mac": _mac(self._secret, doc)}).encode())
        except OSError as err:  # a cache: a read-only state dir only costs time
            log.debug("accountant cache not written (%s)", err)
            return
        self._doc, self._dirty = doc, False
