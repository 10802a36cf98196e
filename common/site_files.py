"""Which files in a site's data folder may be images: the walk every scan of the site starts with.

Kept apart from common/dataset.py (what the files hold) because it runs on every message and
has its own rules: hidden names, links, the label table, files that are plainly not images.
"""

from __future__ import annotations

import os
from pathlib import Path

LABELS_FILE = "labels.csv"
# Files that are clearly not images and are ignored without being reported as skipped.
NON_IMAGE_SUFFIXES = frozenset(
    {".csv", ".txt", ".md", ".json", ".xml", ".html", ".pdf", ".log", ".ini", ".yaml", ".yml", ".toml", ".npy", ".zip"}
)


def candidate_files(root: Path) -> tuple[list[Path], int]:
    """Every file under ``root`` that may be an image, in a stable order, and how many were ignored.

    The order is os.walk's top-down one (a folder's files by name, then its subfolders by name),
    hidden names skipped, symbolic links to folders not followed. Works on os.scandir entries and
    strings until a file is kept: every message scans the site, and at 2,000+ files a Path per name
    and a second stat per folder were a third of a round's set-up."""
    files: list[Path] = []
    ignored = 0
    top = str(root)
    pending = [top]
    while pending:
        folder = pending.pop()
        names: list[str] = []
        subfolders: list[str] = []
        try:
            with os.scandir(folder) as entries:
                for entry in entries:
                    if entry.name.startswith("."):
                        continue
                    try:
                        is_dir = entry.is_dir()
                    except OSError:
                        is_dir = False
                    if not is_dir:
                        names.append(entry.name)
                    elif not entry.is_symlink():
                        subfolders.append(entry.path)
        except OSError:  # unreadable folder: as os.walk, skip it
            continue
        for name in sorted(names):
            if name == LABELS_FILE and folder == top:
                continue
            if os.path.splitext(name)[1].lower() in NON_IMAGE_SUFFIXES:
                ignored += 1
                continue
            files.append(Path(folder, name))
        pending.extend(sorted(subfolders, reverse=True))  # popped in name order
    return files, ignored
