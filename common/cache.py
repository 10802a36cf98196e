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
    files.json                   path -> (size, mtime, ctime, inode, sha256) of every file scanned:
                                 a later scan hashes only new or changed files
    scans/<size>px-<d>.npz       one scan's results in one file (every file's meta or skip reason,
                                 the pixels stacked), <d> = digest of the files' content hashes
    features/<spec>/pack-<d>.npy the fixed features of one scan's kept images, stacked
    features/<spec>/views-<r>-k<K>-<d>.npy (+ .keys.json)  float16 features of views 1..K-1 of
                                 each training image (common/views.py, recipe <r>), and their keys

The packs are what makes a round's set-up cheap: a site with 2,000 images reads two files per
message instead of 6,000, and hashes nothing that has not changed since the last scan.

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


class FileIndex:
    """Content hashes of a site's files by path, size, mtime, ctime and inode (``files.json``).

    A file whose stat is unchanged keeps its hash; any write changes ctime (which no tool can set
    back), so a changed file is always hashed again. :meth:`save` keeps only the files seen in this
    scan (deleted files drop out) and writes atomically; concurrent scans at worst both write.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            doc = json.loads(path.read_text())
            self._known: dict[str, list] = dict(doc["files"]) if doc.get("version") == CACHE_VERSION else {}
        except (OSError, ValueError, KeyError, TypeError):
            self._known = {}
        self._seen: dict[str, list] = {}
        self.hashed = 0  # files hashed in this scan (new or changed)

    def sha256(self, path: Path) -> str:
        """The file's content hash: from the index when its stat is unchanged, else read and hashed."""
        st = os.stat(path)
        stamp = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
        name = str(path)
        entry = self._known.get(name)
        if isinstance(entry, list) and len(entry) == 5 and entry[:4] == stamp and isinstance(entry[4], str):
            key = entry[4]
        else:
            key = file_sha256(path)
            self.hashed += 1
        self._seen[name] = [*stamp, key]
        return key

    def save(self) -> None:
        if self._seen != self._known:
            atomic_write_bytes(self.path, json.dumps({"version": CACHE_VERSION, "files": self._seen}).encode())


def pack_digest(*parts: object) -> str:
    """Names a pack by what it holds (e.g. the cache version, image size and the files' content hashes)."""
    return hashlib.sha256(json.dumps(parts, separators=(",", ":")).encode()).hexdigest()[:32]


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


    # ------------------------------------------------------------------ packs (one file per scan)

    def file_index(self) -> FileIndex:
        return FileIndex(self.root / "files.json")

    def _scan_pack_path(self, size: int, digest: str) -> Path:
        return self.root / "scans" / f"{size}px-{digest}.npz"

    def get_scan_pack(self, size: int, digest: str) -> tuple[list[dict[str, Any]], np.ndarray] | None:
        """(per-file entries, uint8 pixels [n_ok, size, size]) of an earlier identical scan, or None."""
        try:
            with np.load(self._scan_pack_path(size, digest), allow_pickle=False) as z:
                entries, pixels = json.loads(str(z["entries"])), z["pixels"]
        except (OSError, ValueError, KeyError):
            return None
        n_ok = sum(1 for e in entries if e.get("ok"))
        if pixels.dtype != np.uint8 or pixels.shape != (n_ok, size, size):
            return None
        return entries, pixels

    def put_scan_pack(self, size: int, digest: str, entries: list[dict[str, Any]], pixels: np.ndarray) -> None:
        buf = io.BytesIO()
        np.savez(buf, entries=np.array(json.dumps(entries, sort_keys=True)), pixels=np.ascontiguousarray(pixels, np.uint8))
        path = self._scan_pack_path(size, digest)
        atomic_write_bytes(path, buf.getvalue())
        _drop_others(path, f"{size}px-*.npz")

    def _feature_pack_path(self, spec: str, digest: str) -> Path:
        return self.root / "features" / spec / f"pack-{digest}.npy"

    def get_feature_pack(self, spec: str, digest: str, shape: tuple[int, ...]) -> np.ndarray | None:
        """float32 features of ``shape`` [N, ...] stacked for one scan's kept images, or None.

        Memory-mapped copy-on-write: a message reads only the rows it uses, from the page cache
        after the first, instead of 200 MB per message at a 2,000-image site. Packs are replaced
        by rename, never rewritten in place, so a mapping never sees a half-written pack."""
        try:
            arr = np.load(self._feature_pack_path(spec, digest), allow_pickle=False, mmap_mode="c")
        except (OSError, ValueError):
            return None
        return arr if arr.dtype == np.float32 and arr.shape == tuple(shape) else None

    def put_feature_pack(self, spec: str, digest: str, features: np.ndarray) -> None:
        path = self._feature_pack_path(spec, digest)
        atomic_write_bytes(path, _npy_bytes(np.ascontiguousarray(features, dtype=np.float32)))
        _drop_others(path, "pack-*.npy")


    # ------------------------------------------------------------------ augmented views (common/views.py)

    def _views_path(self, spec: str, recipe: str, views: int, digest: str) -> Path:
        return self.root / "features" / spec / f"views-{recipe}-k{views}-{digest}.npy"

    def get_views_pack(self, spec: str, recipe: str, views: int, digest: str,
                       shape: tuple[int, ...]) -> np.ndarray | None:
        """float16 [N, views-1, ...] features of the extra views of one training split, memory-mapped, or None."""
        try:
            arr = np.load(self._views_path(spec, recipe, views, digest), allow_pickle=False, mmap_mode="r")
        except (OSError, ValueError):
            return None
        return arr if arr.dtype == np.float16 and arr.shape == tuple(shape) else None

    def old_views(self, spec: str, recipe: str, views: int) -> tuple[list[str], np.ndarray] | None:
        """(keys, rows) of the last views pack of this recipe (another training split): rows to reuse."""
        for path in sorted(self.root.glob(f"features/{spec}/views-{recipe}-k{views}-*.npy")):
            try:
                keys = json.loads(path.with_suffix(".keys.json").read_text())
                arr = np.load(path, allow_pickle=False, mmap_mode="r")
            except (OSError, ValueError):
                continue
            if isinstance(keys, list) and arr.dtype == np.float16 and len(keys) == len(arr):
                return keys, arr
        return None

    def put_views_pack(self, spec: str, recipe: str, views: int, digest: str, keys: list[str],
                       features: np.ndarray) -> None:
        """Store the pack (keys first, so a pack is never found without them) and drop older ones."""
        path = self._views_path(spec, recipe, views, digest)
        atomic_write_bytes(path.with_suffix(".keys.json"), json.dumps(keys).encode())
        atomic_write_bytes(path, _npy_bytes(np.ascontiguousarray(features, dtype=np.float16)))
        for other in path.parent.glob(f"views-{recipe}-k{views}-*"):
            if other.name not in (path.name, path.with_suffix(".keys.json").name):
                other.unlink(missing_ok=True)


def _drop_others(keep: Path, pattern: str) -> None:
    """Remove the older packs beside ``keep`` (a site's data changed: nobody reads them again)."""
    for other in keep.parent.glob(pattern):
        if other != keep:
            other.unlink(missing_ok=True)


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()
