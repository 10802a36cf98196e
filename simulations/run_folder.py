"""What a finished simulation leaves in its folder: the sites' caches go, unless asked to keep them.

Each simulated site caches its decoded images and their fixed features in its state dir
(common/cache.py), so that rounds after the first decode nothing. After the run they are dead
weight: ``make demo`` left about 0.9 GB per run folder, 0.55 GB of it these caches (the features
twice, per image and packed). A finished run drops them; ``--keep-cache`` keeps them (to time
a second run's set-up, or to look at them). A stopped or failed run keeps them for its resume,
and state dirs given with ``--state-dir`` (shared between runs on purpose) are never touched.
What stays: the hospitals, the ledgers, replies and audit logs, the run (model, card, metrics).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

#: The cache folder inside a site's state dir (common/loaders.py ``load_site``).
CACHE_DIR = "cache"


def folder_bytes(path: Path) -> int:
    """Bytes of the files under ``path`` (links not followed)."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def drop_site_caches(state_root: Path) -> int:
    """Remove ``<state_root>/<site>/cache`` of every site; returns the bytes freed."""
    freed = 0
    for cache in sorted(Path(state_root).glob(f"*/{CACHE_DIR}")):
        if cache.is_dir() and not cache.is_symlink():
            freed += folder_bytes(cache)
            shutil.rmtree(cache, ignore_errors=True)
    return freed


def tidy_after_run(sim_root: Path, state_root: Path, *, keep_cache: bool,
                   say: Callable[[str], None] | None = None) -> str:
    """After a finished run: drop the caches of state dirs inside ``sim_root``; the line saying so (or '').
    ``say`` hears first that it starts: deleting thousands of small files takes half a minute on some disks."""
    inside = Path(state_root).resolve().is_relative_to(Path(sim_root).resolve())
    if keep_cache or not inside or not any(Path(state_root).glob(f"*/{CACHE_DIR}")):
        return ""
    if say is not None:
        say("removing the sites' image and feature caches (`--keep-cache` keeps them) ...")
    freed = drop_site_caches(state_root)
    if not freed:
        return ""
    return (f"removed the sites' image and feature caches ({freed / 1e6:.0f} MB; `--keep-cache` keeps them); "
            f"the folder now holds {folder_bytes(sim_root) / 1e6:.0f} MB")


#: ``<out>/latest``: the newest simulation folder there (a relative symlink), for docs and scripts.
LATEST = "latest"


def point_latest(sim_root: Path) -> Path | None:
    """Make ``<out>/latest`` point at ``sim_root`` (replaced atomically); None when a real folder holds the name."""
    sim_root = Path(sim_root)
    link = sim_root.parent / LATEST
    if sim_root.name == LATEST or (link.exists() and not link.is_symlink()):
        return None
    tmp = sim_root.parent / f".{LATEST}.{os.getpid()}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(sim_root.name, target_is_directory=True)
    os.replace(tmp, link)
    return link
