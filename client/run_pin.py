"""What a site fixes about a run at its first message, and holds the run to until it ends.

The coordinator names a run in every message (run name and run id in the message's config) and
sends the run config with every Flower run it launches. Left free, it could change the target
epsilon or the sampling from one round to the next of one run (a run planned at epsilon 2 then
spends 4.6), or claim a new run id in every message so that per-run limits (max-evaluations,
max-run-epsilon) never fill. So the site pins, in ``<state-dir>/run_pins.json``:

* the run's privacy-relevant settings (:data:`PINNED`) at its first message: a later message of
  the same run with any of them changed is refused, naming each change;
* which Flower run each run lives in: the Flower run id is the SuperLink's, fixed for every
  message of a launched run, so a message of Flower run F that names a run other than the one F
  began with is refused. A new run therefore needs a new launched run (which the coordinator's
  audit log records), and a resumed run (a new Flower run continuing the same run) is accepted.

Read-modify-write holds the file's lock and writes atomically (temp file, rename). A damaged pin
file refuses every run until an operator looks (it is never reset silently).
"""

from __future__ import annotations

import fcntl
import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from common.cache import atomic_write_bytes
from common.config import RunConfig

PINS_FILE = "run_pins.json"
#: Run settings that decide what a run spends or what its replies say about the site's patients.
PINNED = ("dp", "target-epsilon", "noise-multiplier", "num-server-rounds", "sample-rate", "batch-size", "local-epochs",
          "max-grad-norm", "delta", "task", "labels", "label-column", "uncertain", "blank", "image-size")


class RunPinError(ValueError):
    """The run's message does not match what the site pinned for it; the message names every difference."""


def pinned_settings(run: RunConfig) -> dict[str, Any]:
    """The settings a site pins for a run (kebab-case keys, as the run config names them)."""
    values = run.to_mapping()
    return {key: values[key] for key in PINNED}


class RunPins:
    """``<state-dir>/run_pins.json``: per run its pinned settings and Flower runs; per Flower run its run."""

    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / PINS_FILE

    @contextmanager
    def _locked(self) -> Iterator[dict[str, Any]]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "a+b") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield self._read()
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def _read(self) -> dict[str, Any]:
        try:
            doc = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {"runs": {}, "flower_runs": {}}
        except (OSError, ValueError) as err:
            raise RunPinError(f"{self.path} cannot be read ({err}): the site refuses runs until it is restored from "
                              "a backup or moved aside by its operator") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("runs"), dict) or not isinstance(doc.get("flower_runs"), dict):
            raise RunPinError(f"{self.path} is damaged: the site refuses runs until it is restored or moved aside")
        return doc

    def run_settings(self, run_key: str) -> dict[str, Any] | None:
        """What was pinned for ``run_key`` (None: the site has not seen the run)."""
        with self._locked() as doc:
            entry = doc["runs"].get(run_key)
        return dict(entry["settings"]) if entry else None

    def pin(self, run_key: str, run: RunConfig, flower_run_id: int | None) -> bool:
        """Pin the run at its first message or check a later one against the pin; True when newly pinned.

        ``flower_run_id``: the launched run the message came in (None where there is none, e.g. a
        direct call in a test or a benchmark: then only the settings are checked). Raises
        :class:`RunPinError` naming every difference.
        """
        settings = pinned_settings(run)
        with self._locked() as doc:
            problems: list[str] = []
            flower = None if flower_run_id is None else str(int(flower_run_id))
            owner = doc["flower_runs"].get(flower) if flower is not None else None
            if owner is not None and owner != run_key:
                problems.append(f"this launched run (Flower run {flower}) began as another run; one launched run is "
                                "one run here: launch a new one for a new run")
            entry = doc["runs"].get(run_key)
            if entry is not None:
                for key, value in settings.items():
                    if entry["settings"].get(key) != value:
                        problems.append(f"`{key}` = {value!r}, but this run began with {entry['settings'].get(key)!r}")
            if problems:
                raise RunPinError("; ".join(problems) + " (a run's privacy settings are fixed at its first message)")
            created = changed = entry is None
            if entry is None:
                entry = doc["runs"][run_key] = {"settings": settings, "flower_runs": [],
                                                "pinned": datetime.now(UTC).isoformat(timespec="seconds")}
            if flower is not None and flower not in entry["flower_runs"]:
                entry["flower_runs"].append(flower)
                doc["flower_runs"][flower] = run_key
                changed = True
            if changed:
                atomic_write_bytes(self.path, json.dumps(doc, indent=1, sort_keys=True).encode())
        return created
