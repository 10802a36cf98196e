"""From a site folder to torch datasets: scan (through the cache), targets, patient-level split.

This is the one function both the hospital client and the simulations call, so a simulated site
and a real one read their data the same way.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, Subset, TensorDataset

from common.augment import identity, train_transform
from common.cache import CACHE_VERSION, SiteCache, pack_digest
from common.dataset import (
    SiteIndex,
    Split,
    Targets,
    encode_targets,
    patient_strata,
    scan_site,
    site_salt,
    split_patients,
)
from common.labels import LabelPolicy
from common.progress import progress as progress_of
from common.views import VIEW_RECIPE, FeatureViews, render_views

log = logging.getLogger(__name__)


class XrayDataset(Dataset):
    """uint8 images [N, S, S] held in memory + targets; items are ([1, S, S] float in [0,1], target)."""

    def __init__(self, images: np.ndarray, y: np.ndarray, transform: Callable[[torch.Tensor], torch.Tensor] = identity):
        self.images = torch.from_numpy(np.ascontiguousarray(images))
        self.y = torch.from_numpy(np.ascontiguousarray(y))
        self.transform = transform

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.images[i].unsqueeze(0).to(torch.float32).div_(255.0)
        return self.transform(x), self.y[i]


@dataclass
class SiteData:
    """A site's data ready for a run: images at the run's size, targets, the patient-level split."""

    index: SiteIndex
    targets: Targets
    split: Split
    images: np.ndarray  # uint8 [N, S, S], aligned with targets.y
    image_size: int
    cache: SiteCache | None = None  # where fixed features are kept (None: computed every time)

    @property
    def n_train(self) -> int:
        return int(self.split.train.size)

    @property
    def n_val(self) -> int:
        return int(self.split.val.size)

    def patients(self, which: str = "train") -> list[str]:
        """Pseudonyms (site-salted hashes) of the patients on one side of the split: what the ledger charges."""
        recs = self.index.records
        idx = self.split.train if which == "train" else self.split.val
        return sorted({recs[int(self.targets.keep[i])].patient for i in idx})

    def train_hashes(self) -> list[str]:
        """Content hashes of the training images: the input of the ledger's dataset fingerprint."""
        recs = self.index.records
        return [recs[int(self.targets.keep[i])].content_hash for i in self.split.train]

    def val_hashes(self) -> list[str]:
        """Content hashes of the validation images (the evaluation entries' dataset fingerprint)."""
        recs = self.index.records
        return [recs[int(self.targets.keep[i])].content_hash for i in self.split.val]

    def train_dataset(self, augment: bool = True) -> XrayDataset:
        t = train_transform(self.image_size) if augment else identity
        return XrayDataset(self.images[self.split.train], self.targets.y[self.split.train], t)

    def val_dataset(self) -> XrayDataset:
        return XrayDataset(self.images[self.split.val], self.targets.y[self.split.val])

    def features(self, frontend: nn.Module, *, progress: bool = False, batch: int = 32) -> np.ndarray:
        """Fixed features of every kept image, float32 [N, C, h, w], aligned with ``targets.y``.

        ``frontend`` is a data-independent transform without trainable parameters (the ScatterNet's
        scattering). Each image's features are computed once and kept in the site cache under the
        image's content hash and the transform's settings (``frontend.cache_spec``), so every round
        after the first trains from the cache. No augmentation: on Kermany, DP-SGD on cached
        augmented views (one random view per step, or the mean gradient over 5 views) scored
        0.003 below no augmentation on the held-out patients and under synthetic acquisition
        shifts (docs/models.md), and transforming on the fly costs ~8 ms per image per step.
        """
        spec = frontend.cache_spec(self.image_size)
        keys = [self.index.records[int(i)].content_hash for i in self.targets.keep]
        if hasattr(frontend, "out_channels") and hasattr(frontend, "out_size"):  # known: no probe forward pass
            shape = (int(frontend.out_channels), *(int(s) for s in frontend.out_size))
        else:
            with torch.no_grad():
                shape = tuple(frontend(torch.zeros(1, 1, self.image_size, self.image_size)).shape[1:])
        digest = pack_digest(CACHE_VERSION, spec, list(shape), keys)
        if self.cache is not None:  # every later round: one file, not one per image
            packed = self.cache.get_feature_pack(spec, digest, (len(keys), *shape))
            if packed is not None:
                return packed
        out = np.empty((len(keys), *shape), dtype=np.float32)
        missing = []
        for i, key in enumerate(keys):
            found = self.cache.get_features(key, spec, shape) if self.cache is not None else None
            if found is None:
                missing.append(i)
            else:
                out[i] = found
        if missing:
            # A bar on a terminal, else a line every few seconds (common/progress.py): minutes at a large site.
            bar = progress_of(len(missing), "computing features", "img", bar=progress, leave=False)
            log.info("computing %s features for %d of %d image(s) (cached for later rounds)", spec, len(missing), len(keys))
            for start in range(0, len(missing), batch):
                idx = missing[start:start + batch]
                x = torch.from_numpy(self.images[idx]).to(torch.float32).div_(255.0).unsqueeze(1)
                with torch.no_grad():
                    feats = frontend(x).numpy()
                for j, i in enumerate(idx):
                    out[i] = feats[j]
                    if self.cache is not None:
                        self.cache.put_features(keys[i], spec, feats[j])
                bar.update(len(idx))
            bar.close()
        if self.cache is not None:
            self.cache.put_feature_pack(spec, digest, out)
        return out

    def feature_datasets(self, frontend: nn.Module, *, progress: bool = False) -> tuple[TensorDataset, TensorDataset]:
        """(train, validation) datasets of cached fixed features and targets."""
        feats = self.features(frontend, progress=progress)
        y = self.targets.y

        def part(idx: np.ndarray) -> TensorDataset:
            return TensorDataset(torch.from_numpy(np.ascontiguousarray(feats[idx])), torch.from_numpy(np.ascontiguousarray(y[idx])))

        return part(self.split.train), part(self.split.val)

    def feature_dataset(self, frontend: nn.Module, which: str = "train", *, progress: bool = False) -> Dataset:
        """Cached fixed features and targets of one side of the split ("train" or "val"), without copying
        the feature array (a round's set-up at a 2,000-image site copied 200 MB twice per message)."""
        full = TensorDataset(torch.from_numpy(self.features(frontend, progress=progress)),
                             torch.from_numpy(np.ascontiguousarray(self.targets.y)))
        return Subset(full, (self.split.train if which == "train" else self.split.val).tolist())

    def feature_views(self, frontend: nn.Module, views: int, *, progress: bool = False, batch: int = 16) -> FeatureViews:
        """The training split's features in ``views`` views per image (common/views.py): augmentation multiplicity.

        View 0 is :meth:`features`; views 1..K-1 are rendered from the cached image and passed through
        ``frontend`` once, then kept in the site cache as one float16 pack for this training split
        (rows of an earlier split's pack are reused by content hash, so a new image costs only its own views).
        """
        plain = self.features(frontend, progress=progress)
        idx = self.split.train
        keys = [self.index.records[int(self.targets.keep[i])].content_hash for i in idx]
        shape = tuple(int(d) for d in plain.shape[1:])
        spec = frontend.cache_spec(self.image_size)
        digest = pack_digest(CACHE_VERSION, spec, VIEW_RECIPE, views, list(shape), keys)
        want = (len(keys), views - 1, *shape)
        extra = self.cache.get_views_pack(spec, VIEW_RECIPE, views, digest, want) if self.cache is not None else None
        if extra is None:
            extra = np.empty(want, np.float16)
            old = self.cache.old_views(spec, VIEW_RECIPE, views) if self.cache is not None else None
            rows = {k: r for r, k in enumerate(old[0])} if old is not None else {}
            missing = []
            for i, key in enumerate(keys):
                if key in rows:
                    extra[i] = old[1][rows[key]]  # type: ignore[index]
                else:
                    missing.append(i)
            if missing:
                log.info("rendering %d view(s) of %d training image(s) and their %s features (cached for later rounds)",
                         views - 1, len(missing), spec)
            bar = None
            if progress and missing:
                from tqdm.auto import tqdm

                bar = tqdm(total=len(missing), desc="views", unit="img", leave=False)
            for start in range(0, len(missing), batch):
                chunk = missing[start:start + batch]
                rendered = render_views(self.images[idx[chunk]], [keys[i] for i in chunk], views)
                flat = torch.from_numpy(rendered.reshape(-1, 1, *rendered.shape[2:]))
                with torch.no_grad():
                    feats = frontend(flat).numpy()
                extra[chunk] = feats.reshape(len(chunk), views - 1, *shape).astype(np.float16)
                if bar is not None:
                    bar.update(len(chunk))
            if bar is not None:
                bar.close()
            if self.cache is not None:
                self.cache.put_views_pack(spec, VIEW_RECIPE, views, digest, keys, extra)
        return FeatureViews(np.ascontiguousarray(plain[idx]), extra, np.ascontiguousarray(self.targets.y[idx]))

    def prevalence(self, which: str = "train") -> list[float]:
        """Share of positives per output (binary/multilabel) or per class (multiclass)."""
        idx = self.split.train if which == "train" else self.split.val
        y = self.targets.y[idx]
        if y.size == 0:
            return []
        if self.targets.task == "multiclass":
            counts = np.bincount(y, minlength=len(self.targets.labels))
            return [float(c) / len(y) for c in counts]
        return [float(v) for v in np.nanmean(y, axis=0)]  # masked findings (NaN) left out


def load_site(
    data_dir: str | os.PathLike,
    state_dir: str | os.PathLike,
    *,
    image_size: int,
    task: str,
    labels: tuple[str, ...],
    val_fraction: float,
    progress: bool = False,
    policy: LabelPolicy | None = None,
) -> SiteData:
    """Scan ``data_dir`` through the site cache in ``state_dir`` and split it by patient.

    ``val_fraction`` is the site's own setting (node config): the split depends on nothing the
    coordinator chooses (common.dataset.split_patients). ``policy`` says how the label table gives
    the targets (label column, -1 / blank, the site's names; default: chosen from the table).
    """
    state = Path(state_dir)
    cache = SiteCache(state / "cache")
    index = scan_site(data_dir, salt=site_salt(state), image_size=image_size, cache=cache, progress=progress)
    if index.skipped:
        log.warning("%d file(s) skipped (run `fl-client check` for the reasons)", len(index.skipped))
    targets = encode_targets(index, task, labels, policy)
    if targets.not_labelled:
        log.warning("this site does not label %s: masked for all its images (it trains on the other labels)",
                    ", ".join(targets.not_labelled))
    for reason, n in targets.dropped.items():
        log.warning("%d image(s) left out: %s", n, reason)
    kept = [index.records[int(i)] for i in targets.keep]
    split = split_patients([r.patient for r in kept], patient_strata(targets), val_fraction=val_fraction)
    images = np.stack([r.pixels for r in kept])  # type: ignore[misc]
    return SiteData(index, targets, split, images, image_size, cache)
