"""Crash-safe checkpoints of a run, one per round, and what `resume` needs to continue.

``<run-dir>/checkpoints/round-00003.pt`` holds the global weights after that round, the round
number, the strategy's server-optimiser state and the round records so far. It is written to a
temporary file and renamed, so a crash leaves the previous checkpoint intact; ``latest`` is found
by listing, not by a pointer file that could disagree.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.cache import atomic_write_bytes

_NAME = re.compile(r"round-(\d{5})\.pt$")


class CheckpointError(RuntimeError):
    """No usable checkpoint where one was expected."""


@dataclass
class Checkpoint:
    round: int  # last completed round
    weights: dict[str, np.ndarray]  # global model after that round
    strategy_state: dict[str, Any]
    history: list[dict[str, Any]]  # round records 1..round
    run_config: dict[str, Any]


def _to_tensors(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj))
    if isinstance(obj, dict):
        return {k: _to_tensors(v) for k, v in obj.items()}
    return obj


def _to_numpy(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.numpy()
    if isinstance(obj, dict):
        return {k: _to_numpy(v) for k, v in obj.items()}
    return obj


def save_checkpoint(run_dir: Path, ckpt: Checkpoint, *, keep: int = 3) -> Path:
    """Write round ``ckpt.round`` atomically; keep the newest ``keep`` checkpoints."""
    folder = Path(run_dir) / "checkpoints"
    payload = {
        "round": ckpt.round,
        "weights": _to_tensors(ckpt.weights),
        "strategy_state": _to_tensors(ckpt.strategy_state),
        "history": ckpt.history,
        "run_config": ckpt.run_config,
        "format": 1,
    }
    buf = io.BytesIO()
    torch.save(payload, buf)
    path = folder / f"round-{ckpt.round:05d}.pt"
    atomic_write_bytes(path, buf.getvalue())
    for old in sorted(p for p in folder.glob("round-*.pt") if _NAME.search(p.name))[:-keep]:
        old.unlink(missing_ok=True)
    return path


BEST_FILE = "best.pt"


def save_best(run_dir: Path, round_: int, weights: dict[str, np.ndarray], pooled_auc: float) -> Path:
    """Keep the global model of the round with the best pooled validation AUC (atomic, like the checkpoints)."""
    buf = io.BytesIO()
    torch.save({"round": int(round_), "weights": _to_tensors(weights), "pooled_auc": float(pooled_auc), "format": 1}, buf)
    path = Path(run_dir) / "checkpoints" / BEST_FILE
    atomic_write_bytes(path, buf.getvalue())
    return path


def load_best(run_dir: Path) -> tuple[int, dict[str, np.ndarray], float] | None:
    """(round, weights, pooled AUC) of the best round so far, or None (none yet, or unreadable)."""
    path = Path(run_dir) / "checkpoints" / BEST_FILE
    try:
        raw = torch.load(path, weights_only=True)
        return int(raw["round"]), _to_numpy(raw["weights"]), float(raw["pooled_auc"])
    except Exception:  # noqa: BLE001 - absent or damaged: the last round is exported instead
        return None


def latest_checkpoint(run_dir: Path) -> Checkpoint | None:
    """The newest readable checkpoint (a damaged newest one falls back to the one before)."""
    folder = Path(run_dir) / "checkpoints"
    for path in sorted((p for p in folder.glob("round-*.pt") if _NAME.search(p.name)), reverse=True):
        try:
            raw = torch.load(path, weights_only=True)
            _ = raw["round"], raw["weights"], raw["history"]
        except Exception:  # noqa: BLE001 - any unreadable file (torch raises many kinds): try the older one
            continue
        return Checkpoint(
            round=int(raw["round"]), weights=_to_numpy(raw["weights"]),
            strategy_state=_to_numpy(raw["strategy_state"]), history=list(raw["history"]),
            run_config=dict(raw["run_config"]),
        )
    return None
