"""The site's preprocessing cache: decode each file once, read arrays afterwards.

Decoding a 15-bit JPEG 2000 radiograph takes far longer than a training step on a 64 px copy of
it, and a federated run visits the same images every round. The cache keeps, per file *content*
(sha256 of the bytes, so a changed file is re-decoded and a renamed one is not) and per image
size, the resized image as uint8 display values, plus the file's non-identifying metadata or the
reason it could not be read (so a corrupt file is not retried every round).

Layout under ``<state-dir>/cache``::

    meta/<h[:2]>/<h>.json        {"ok": true, "meta": {...}} or {"ok": false, "reason": "..."}
    <size>px/<h[:2]>/<h>.npy     uint8 [size, size]
    features/<spec>/<h[:2]>/<h>.npy   float32 fixed features of that image (e.g. scattering
                                 coefficients; <spec> names the transform and its settings)

Fixed features cost no privacy (they never look at other images or labels), so computing them
once and training every later round from the cache changes nothing but the time a round takes.

Every write goes to a temporary file in the same folder and is renamed into place, so a crash
leaves either the old entry or the new one, never half a file; concurrent writers (deployment
starts one process per Flower message) at worst both write the same bytes.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import secrets
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

CACHE_VERSION = 1  # bump when the decode chain changes, so old entries are not reused


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes: the cache key and the dataset fingerprint's input."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same folder and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_durable(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Durable atomic write for keys, certificates and requests.

    Temp file in the same folder, fsync, ``os.replace``, fsync of the folder; the file has ``mode``
    (e.g. 0600 for a private key) from creation on, whatever the umask.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)  # exact mode whatever the umask
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class SiteCache:
    """Content-addressed cache of decoded, resized images and file metadata for one site."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root) / f"v{CACHE_VERSION}"

    def _meta_path(self, key: str) -> Path:
        return self.root / "meta" / key[:2] / f"{key}.json"

    def _pixels_path(self, key: str, size: int) -> Path:
        return self.root / f"{size}px" / key[:2] / f"{key}.npy"

    def get_meta(self, key: str) -> dict[str, Any] | None:
        """The stored entry for this content, or None when it was never decoded (or is unreadable)."""
        try:
            return json.loads(self._meta_path(key).read_text())
        except (OSError, ValueError):
            return None

    def put_meta(self, key: str, entry: dict[str, Any]) -> None:
        atomic_write_bytes(self._meta_path(key), json.dumps(entry, sort_keys=True).encode())

    def get_pixels(self, key: str, size: int) -> np.ndarray | None:
        """uint8 [size, size] or None when absent or damaged (then it is simply re-decoded)."""
        path = self._pixels_path(key, size)
        try:
            arr = np.load(path, allow_pickle=False)
        except (OSError, ValueError):
            return None
        if arr.dtype != np.uint8 or arr.shape != (size, size):
            return None
        return arr

    def put_pixels(self, key: str, size: int, pixels: np.ndarray) -> None:
        atomic_write_bytes(self._pixels_path(key, size), _npy_bytes(np.ascontiguousarray(pixels, dtype=np.uint8)))

    def _features_path(self, key: str, spec: str) -> Path:
        return self.root / "features" / spec / key[:2] / f"{key}.npy"

    def get_features(self, key: str, spec: str, shape: tuple[int, ...]) -> np.ndarray | None:
        """float32 features of ``shape`` for this content and transform, or None (then they are recomputed)."""
        try:
            arr = np.load(self._features_path(key, spec), allow_pickle=False)
        except (OSError, ValueError):
            return None
        if arr.dtype != np.float32 or arr.shape != tuple(shape):
            return None
        return arr

    def put_features(self, key: str, spec: str, features: np.ndarray) -> None:
        atomic_write_bytes(self._features_path(key, spec), _npy_bytes(np.ascontiguousarray(features, dtype=np.float32)))


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()
