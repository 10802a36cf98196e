"""The fedxray Flower App Bundle (FAB): which files it holds, its hash, and a clean folder to ship it from.

``flwr run APP`` walks every file under APP (a checkout holds a virtualenv and run folders: 60,000
files, 14 s here) before it filters them down to the app. fedxray builds the bundle from its app
files only, the ones pyproject's ``fab-include`` names, and ships it from a staged copy of just
those files. The bytes, and so the sha256 that sites approve, are what Flower builds for the same
files: the FAB format is deterministic (fixed timestamps, sorted entries).
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

APP_PACKAGES = ("common", "client", "server")
APP_NAME = "fedxray"


class BundleError(RuntimeError):
    """fedxray is not installed from a source folder, so no bundle can be built."""


def packages_root() -> Path:
    """The folder that holds fedxray's packages (a checkout, or site-packages): what PYTHONPATH needs."""
    return Path(__file__).resolve().parents[1]


def project_root() -> Path:
    """The folder that holds fedxray's pyproject.toml (an editable install from a checkout)."""
    root = packages_root()
    if not (root / "pyproject.toml").is_file():
        raise BundleError(f"no pyproject.toml next to the fedxray packages ({root}): install fedxray from its source "
                          "folder (pip install -e .)")
    return root


def app_files(root: Path | None = None) -> dict[str, Path]:
    """Relative path -> file for everything the bundle may hold: pyproject, .gitignore, the app's .py files."""
    root = root or project_root()
    files = {"pyproject.toml": root / "pyproject.toml"}
    if (root / ".gitignore").is_file():
        files[".gitignore"] = root / ".gitignore"
    for package in APP_PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            if path.is_file() and not path.is_symlink() and "__pycache__" not in path.parts:
                files[path.relative_to(root).as_posix()] = path
    return files


def build_bundle(root: Path | None = None) -> tuple[str, bytes]:
    """(sha256, FAB bytes) exactly as `flwr run` would build them from this source."""
    from flwr.cli.build import build_fab_from_files  # deferred: Flower is common/'s one exception, needed here only

    fab, _ = build_fab_from_files(app_files(root))
    return hashlib.sha256(fab).hexdigest(), fab


def stage_app(dest: Path, root: Path | None = None) -> Path:
    """Copy the app files into ``dest/fedxray`` (replaced if present) and return it, for `flwr run`."""
    app = Path(dest) / APP_NAME
    if app.exists():
        shutil.rmtree(app)
    for rel, path in app_files(root).items():
        target = app / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    return app
