"""The study's data: hospitals, every site read as a site reads it, fixed features, and the NIH images.

* Kermany is partitioned into hospitals (patient-level hold-out + Dirichlet label and quantity skew),
  each written as DICOM through its own acquisition profile, and read back through the site path
  (common.loaders.load_site: DICOM chain, cache, the site's own patient-level split).
* A ScatterNet's fixed features are computed once per image and kept in each site's cache
  (SiteData.features), exactly where the simulated sites of the federated arms find them again.
* The NIH ChestX-ray14 sample (adults, another hospital, another population) is read through the one
  image path (common.preprocess) for the transfer figure and the public warm start. Its label is
  normal vs *any* of the 14 findings, not pneumonia.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

HOLDOUT = "holdout"
NIH_DIR_NAME = "nih-cxr14-1000"
NIH_POSITIVE = "ABNORMAL"  # NIH sample: label 1 = at least one of the 14 findings (not pneumonia)
#: Share of the NIH patients kept to choose the pretraining round (the rest pretrain).
NIH_VAL_FRACTION = 0.2

Say = Callable[[str], None]


class StudyError(RuntimeError):
    """The study cannot go on; the message says what to change."""


@dataclass
class NihImages:
    """The NIH sample at the study's image size: float32 [N, 1, S, S] in [0, 1], labels, a patient split."""

    x: np.ndarray
    y: np.ndarray  # 1 = any finding
    pretrain: np.ndarray  # indices of the patients used for pretraining
    val: np.ndarray  # indices of the patients that choose the pretraining round
    cache_dir: Path
    features: dict[str, np.ndarray] = field(default_factory=dict)  # cache spec -> [N, K, h, w]

    def feature_array(self, frontend: Any) -> np.ndarray:
        """Fixed features of every NIH image (computed once, kept under ``cache_dir``)."""
        spec = frontend.cache_spec(self.x.shape[-1])
        if spec not in self.features:
            path = self.cache_dir / f"features-{spec}.npy"
            if path.is_file():
                self.features[spec] = np.load(path)
            else:
                self.features[spec] = compute_features(frontend, self.x)
                _save_npy(path, self.features[spec])
        return self.features[spec]


@dataclass
class StudyData:
    """Every site (train/validation split as the site makes it), the common test set and the NIH images."""

    sites: dict[str, Any]  # hospital name -> common.loaders.SiteData
    test: Any  # the hold-out (common test set) as a SiteData; every image is tested
    positive: str
    manifest: dict[str, Any]
    nih: NihImages | None = None

    def site(self, name: str) -> Any:
        return self.test if name == HOLDOUT else self.sites[name]

    def arrays(self, names: Sequence[str], part: str, frontend: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """(inputs, 0/1 targets) of ``part`` (train | val | all) of the named sites, concatenated.

        Inputs are the cached fixed features when ``frontend`` is given, else float images [N, 1, S, S].
        """
        xs, ys = [], []
        for name in names:
            d = self.site(name)
            idx = {"train": d.split.train, "val": d.split.val, "all": np.arange(len(d.targets.y))}[part]
            src = d.features(frontend) if frontend is not None else d.images
            xs.append(src[idx])
            ys.append(d.targets.y[idx, 0])
        x = np.concatenate(xs)
        if frontend is None:
            x = as_input(x)
        return x, np.concatenate(ys).astype(np.int64)


    def train_views(self, names: Sequence[str], frontend: Any, views: int) -> Any:
        """The named sites' training images in ``views`` views each (common/views.py), as one data set;
        targets float32 [N, 1] like :meth:`arrays` gives them to a binary model."""
        from common.views import FeatureViews

        parts = [self.site(name).feature_views(frontend, views) for name in names]
        return FeatureViews(np.concatenate([p.plain for p in parts]), np.concatenate([p.extra for p in parts]),
                            np.concatenate([p.y.numpy()[:, :1] for p in parts]).astype(np.float32))


def as_input(images_u8: np.ndarray) -> np.ndarray:
    """uint8 [N, S, S] site images -> float32 [N, 1, S, S] in [0, 1] (the model's input)."""
    return (images_u8.astype(np.float32) / 255.0)[:, None]


def compute_features(frontend: Any, x: np.ndarray, batch: int = 64) -> np.ndarray:
    """Fixed features of float images [N, 1, S, S], in batches, without gradients."""
    import torch

    out = []
    with torch.no_grad():
        for start in range(0, len(x), batch):
            out.append(frontend(torch.from_numpy(np.ascontiguousarray(x[start:start + batch]))).numpy())
    return np.concatenate(out) if out else np.zeros((0,), np.float32)


def _save_npy(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, array)
    tmp.replace(path)


# --------------------------------------------------------------------------- Kermany hospitals


def prepare_hospitals(data: Path, out: Path, s: Any, say: Say) -> dict[str, Any]:
    """out/hospitals: the hold-out and the hospitals as DICOM (written once, reused on resume)."""
    from simulations.hospitals import MANIFEST_FILE, make_hospitals_from_images

    hospitals = out / "hospitals"
    manifest_path = hospitals / MANIFEST_FILE
    if manifest_path.is_file():
        say(f"hospitals: reusing {hospitals}")
        return json.loads(manifest_path.read_text())
    if hospitals.exists():
        shutil.rmtree(hospitals)  # an interrupted write: start it again
    t0 = time.monotonic()
    say(f"hospitals: {s.sites} sites + {s.holdout:.0%} patient hold-out from {data} (label-and-quantity skew, alpha {s.alpha}) ...")
    # Written at 64 px or more, as `fl-sim run` writes the hospitals it makes from an image set.
    make_hospitals_from_images(data, hospitals, s.sites, partition="label-and-quantity", alpha=s.alpha,
                               holdout_fraction=s.holdout, seed=s.seed, max_images=s.max_images,
                               image_size=max(s.image_size, 64), progress=sys.stderr.isatty())
    manifest = json.loads(manifest_path.read_text())
    for site in manifest["sites"] + ([manifest["holdout"]] if manifest.get("holdout") else []):
        per_class = ", ".join(f"{k} {v}" for k, v in sorted(site["images_per_class"].items()))
        say(f"  {site['name']:<12} {site['n_patients']:>5} patients {site['n_images']:>5} images ({per_class})")
    say(f"hospitals: written in {time.monotonic() - t0:.0f} s")
    return manifest


def read_sites(out: Path, s: Any, manifest: dict[str, Any], say: Say) -> StudyData:
    """Every hospital and the hold-out through common.loaders.load_site, into out/state/<site>."""
    from common.loaders import load_site

    positive = manifest["classes"][-1]
    names = [site["name"] for site in manifest["sites"]]
    if not manifest.get("holdout"):
        raise StudyError("the hospitals have no hold-out set; rebuild them with a holdout fraction > 0")
    t0 = time.monotonic()
    sites = {}
    for name in [*names, HOLDOUT]:
        sites[name] = load_site(out / "hospitals" / name, out / "state" / name, image_size=s.image_size, task="binary",
                                labels=(positive,), val_fraction=s.val_fraction)
    test = sites.pop(HOLDOUT)
    say(f"sites read through load_site in {time.monotonic() - t0:.0f} s: "
        + ", ".join(f"{n} {d.n_train}+{d.n_val}" for n, d in sites.items()) + f"; test {len(test.targets.y)} images")
    return StudyData(sites, test, positive, manifest)


def cache_features(data: StudyData, frontend: Any, say: Say, views: int = 1) -> None:
    """Compute (or find) every site's fixed features once, in its own cache, before any arm trains,
    and with ``views`` > 1 the augmented views of its training images (common/views.py)."""
    t0 = time.monotonic()
    for name in [*data.sites, HOLDOUT]:
        data.site(name).features(frontend)
        if views > 1 and name != HOLDOUT:
            data.site(name).feature_views(frontend, views)
    if data.nih is not None:
        data.nih.feature_array(frontend)
    say(f"features ({frontend.cache_spec(data.test.image_size)}) of every image ready in {time.monotonic() - t0:.0f} s")


def arm_state(out: Path, arm_dir: Path, site_names: Sequence[str]) -> Path:
    """Fresh per-arm state dirs (own ledger) sharing each site's salt (same split) and cache (images, features)."""
    root = arm_dir / "state"
    for name in site_names:
        src, dst = out / "state" / name, root / name
        dst.mkdir(parents=True, exist_ok=True)
        if not (dst / "salt").exists():
            shutil.copy2(src / "salt", dst / "salt")
        if not (dst / "cache").exists():
            (dst / "cache").symlink_to((src / "cache").resolve(), target_is_directory=True)
    return root


def federation_folder(out: Path, left_out: str | None) -> Path:
    """The hospital folders a federated arm runs on: all of them, or (leave-one-out) all but one.

    A leave-one-hospital-out federation gets a folder of links to the other hospitals and to the
    hold-out (the coordinator's parity images), so `fl-sim run` sees exactly those sites.
    """
    hospitals = out / "hospitals"
    if left_out is None:
        return hospitals
    folder = out / "loho" / left_out
    folder.mkdir(parents=True, exist_ok=True)
    for src in sorted(p for p in hospitals.iterdir() if p.is_dir() and p.name != left_out):
        link = folder / src.name
        if not link.exists():
            link.symlink_to(src.resolve(), target_is_directory=True)
    return folder


# --------------------------------------------------------------------------- NIH


def default_nih_dir(data: Path) -> Path | None:
    """The NIH sample next to the image set (../shared/data/nih-cxr14-1000), if it is there."""
    candidate = data.parent / NIH_DIR_NAME
    return candidate if (candidate / "labels.csv").is_file() else None


def read_nih(nih_dir: Path, out: Path, s: Any, say: Say) -> NihImages:
    """The NIH images at the study's size through common.preprocess (PNG -> [0, 1] -> resize), cached."""
    from common.preprocess import load_pixels, to_model_input
    from simulations.hospitals import load_image_set
    from simulations.partition import holdout_split

    cache_dir = out / "nih"
    path = cache_dir / f"images-{s.image_size}px-{s.nih_max_images or 'all'}.npz"
    if path.is_file():
        z = np.load(path)
        x, y, patients = z["x"], z["y"], z["patients"]
    else:
        t0 = time.monotonic()
        images, _ = load_image_set(nih_dir)
        images = sorted(images, key=lambda i: i.path.as_posix())
        if s.nih_max_images and s.nih_max_images < len(images):
            keep = np.random.default_rng(s.seed).choice(len(images), s.nih_max_images, replace=False)
            images = [images[i] for i in sorted(keep)]
        x = np.stack([to_model_input(load_pixels(i.path), s.image_size)[0] for i in images])
        y = np.array([i.label for i in images], dtype=np.int64)
        patients = np.array([str(i.patient) for i in images])
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = cache_dir / "images.tmp.npz"
        np.savez(tmp, x=x, y=y, patients=patients)
        tmp.replace(path)
        say(f"NIH: {len(y)} images ({int(y.sum())} with a finding) from {nih_dir} read in {time.monotonic() - t0:.0f} s")
    per_patient: dict[str, int] = {}
    for p, label in zip(patients.tolist(), y.tolist(), strict=True):
        per_patient[p] = max(per_patient.get(p, 0), int(label))
    held, _ = holdout_split(per_patient, NIH_VAL_FRACTION, seed=s.seed)
    held_set = set(held)
    is_val = np.array([p in held_set for p in patients.tolist()])
    return NihImages(x.astype(np.float32), y, np.flatnonzero(~is_val), np.flatnonzero(is_val), cache_dir)
