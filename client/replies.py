"""The replies a site has released: a retried round gets the same bytes again, or is charged as a new release.

Training again from the same global weights releases a second noisy update; re-sending the stored
reply releases nothing new. So a retry (coordinator crash, resume, lost reply) is free only when
the site can re-send exactly what it sent before. Two things make that hold whatever the
coordinator does:

* every reply is keyed by the run's identity, the round and the **full** sha256 of the global
  weights it started from (a shortened hash lets a coordinator search for two weight sets that
  share it and buy a second release of the round for free);
* the site remembers every release, in ``released.jsonl`` beside the stored replies, for as long
  as the ledger does (forever): the bulky weights of old rounds are pruned to save disk, but a
  round whose reply is gone is then a **new** release, and :func:`release_id` gives it a new
  ledger key so it is charged again. A round charged but never released (a crash during
  training) keeps its charge and its key: the retry trains once, under the charge already made.

A stored reply is returned only if its bytes still hash to what the index recorded when it was
released; a damaged or edited file counts as pruned. Files are 0600: a reply is the site's update.
Callers hold the site lock (client/round.py ``site_lock``) around ``get`` ... ``put``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from common.cache import atomic_write_bytes

#: The index of every release of one run's replies of one kind (train or evaluate), never pruned.
RELEASED = "released.jsonl"
#: Rounds of its own run whose weights a store keeps: the latest and the one before (a resume retries it).
KEEP_ROUNDS = 2
#: Other runs' stored weights go once untouched this long (their index stays).
KEEP_DAYS = 30.0


def run_folder(state_dir: Path, run_key: str, kind: str) -> Path:
    """``<state-dir>/replies/<hash of run key and kind>``: no coordinator-chosen text in a path, no two runs sharing one."""
    name = hashlib.sha256(f"{kind}\n{run_key}".encode()).hexdigest()[:32]
    return Path(state_dir) / "replies" / name


def release_id(run_key: str, digest: str, earlier_releases: int) -> str:
    """The ledger's run id of a release: run key and full weights hash, and ``#n`` for the n-th release of it."""
    base = f"{run_key}@{digest}"
    return base if earlier_releases == 0 else f"{base}#{earlier_releases + 1}"


class ReplyStore:
    """One run's released replies of one kind (``train`` or ``evaluate``) under a site's state dir."""

    def __init__(self, state_dir: Path, run_key: str, kind: str = "train") -> None:
        self.root = run_folder(state_dir, run_key, kind)
        self.index = self.root / RELEASED

    def _path(self, server_round: int, digest: str) -> Path:
        return self.root / f"round-{server_round:05d}-{digest}.pt"

    def _released(self, server_round: int, digest: str) -> list[dict[str, Any]]:
        try:
            lines = self.index.read_text().splitlines()
        except FileNotFoundError:
            return []
        out = []
        for line in lines:
            try:
                item = json.loads(line)
            except ValueError:
                continue  # a torn last line (crash mid-append): that release was never returned
            if item.get("round") == server_round and item.get("digest") == digest:
                out.append(item)
        return out

    def releases(self, server_round: int, digest: str) -> int:
        """How often this round, from these weights, has been released (0: never; pruned ones included)."""
        return len(self._released(server_round, digest))

    def get(self, server_round: int, digest: str) -> dict[str, Any] | None:
        """The last reply released for (round, weights), byte for byte as stored; None when pruned or damaged."""
        released = self._released(server_round, digest)
        if not released:
            return None
        try:
            data = self._path(server_round, digest).read_bytes()
        except OSError:
            return None
        if hashlib.sha256(data).hexdigest() != released[-1].get("sha256"):
            return None
        try:
            return torch.load(io.BytesIO(data), weights_only=True)
        except (RuntimeError, EOFError, ValueError):
            return None

    def put(self, server_round: int, digest: str, reply: dict[str, Any]) -> None:
        """Store a reply about to be released and record the release (durably) before the caller returns it."""
        buf = io.BytesIO()
        torch.save(reply, buf)
        data = buf.getvalue()
        path = self._path(server_round, digest)
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, data)
        os.chmod(path, 0o600)
        line = json.dumps({"round": server_round, "digest": digest, "sha256": hashlib.sha256(data).hexdigest(),
                           "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}) + "\n"
        fd = os.open(self.index, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        self.prune(server_round)

    def prune(self, server_round: int, *, keep_days: float = KEEP_DAYS) -> int:
        """Drop stored weights nobody is likely to ask for again; the release index always stays. Files removed.

        This run: weights of rounds before the previous one. Other runs: weights untouched for
        ``keep_days``. A round asked for again after its weights went is trained and charged anew.
        """
        removed = 0
        for path in self.root.glob("round-*.pt"):
            try:
                if int(path.name.split("-")[1]) <= server_round - KEEP_ROUNDS:
                    path.unlink(missing_ok=True)
                    removed += 1
            except (ValueError, IndexError):
                continue
        cutoff = time.time() - keep_days * 86400
        parent = self.root.parent
        for other in parent.iterdir() if parent.is_dir() else ():
            if other == self.root or not other.is_dir():
                continue
            try:
                stored = list(other.glob("round-*.pt"))
                if stored and all(p.stat().st_mtime < cutoff for p in stored):
                    for p in stored:
                        p.unlink(missing_ok=True)
                        removed += 1
            except OSError:
                continue
        return removed
