"""The shift benchmark's data: the study's hospitals, the held-out source images, and their rendered features.

Import from a script in this folder as ``from shift_data import ...`` (see _util.py for why).
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.preprocess import load_pixels, to_model_input
from simulations.shift_conditions import CONDITIONS, render

MULTICLASS = ("normal", "bacteria", "virus")


@dataclass
class ShiftData:
    """The study's sites (read as a site reads them), the held-out patients' source images, and where work goes."""

    work: Path
    sites: dict[str, Any]  # hospital -> common.loaders.SiteData (binary task)
    positive: str
    test_paths: list[Path]  # the held-out patients' source images (native resolution)
    test_y: np.ndarray  # 0/1
    test_subtype: np.ndarray  # index into MULTICLASS
    out: Path
    settings: Any
    manifest: dict[str, Any]
    _multiclass: dict[str, Any] = field(default_factory=dict)

    def multiclass_sites(self) -> dict[str, Any]:
        """The same hospitals read for the three-class task (labels.csv column ``subtype``), as a site would."""
        if not self._multiclass:
            from common.labels import LabelPolicy
            from common.loaders import load_site

            for name in self.sites:
                self._multiclass[name] = load_site(self.out / "hospitals" / name, self.out / "state" / name,
                                                   image_size=self.settings.image_size, task="multiclass",
                                                   labels=MULTICLASS, val_fraction=self.settings.val_fraction,
                                                   policy=LabelPolicy(label_column="subtype"))
        return self._multiclass

    def describe(self) -> dict[str, Any]:
        return {"sites": {n: {"train": d.n_train, "val": d.n_val} for n, d in self.sites.items()},
                "test_images": int(len(self.test_y)), "test_positive": int(self.test_y.sum()),
                "test_subtypes": {c: int((self.test_subtype == i).sum()) for i, c in enumerate(MULTICLASS)}}


def load_shift_data(out: Path, source: Path, say: Callable[[str], None]) -> ShiftData:
    """The study's hospitals (made with the study's settings if ``out`` has none) and the held-out source images."""
    from simulations.hospitals import load_image_set
    from simulations.partition import holdout_split
    from simulations.study import StudySettings
    from simulations.study_data import prepare_hospitals, read_sites

    settings = StudySettings()
    out.mkdir(parents=True, exist_ok=True)
    manifest = prepare_hospitals(source, out, settings, say)
    data = read_sites(out, settings, manifest, say)
    images, _ = load_image_set(source)  # the hold-out again, from the source set, as the study partitioned it
    by_patient: dict[str, list[Any]] = defaultdict(list)
    for img in images:
        by_patient[img.patient].append(img)
    held, _ = holdout_split({p: max(i.label for i in imgs) for p, imgs in by_patient.items()}, settings.holdout,
                            seed=settings.seed)
    test = sorted((img for p in held for img in by_patient[p]), key=lambda i: i.path.as_posix())
    expected = manifest["holdout"]["n_images"]
    if len(test) != expected:
        raise RuntimeError(f"re-derived hold-out has {len(test)} images, the study's has {expected}: other settings?")
    subtype = np.array([MULTICLASS.index(dict(i.extra).get("subtype", "normal").lower()) for i in test])
    return ShiftData(out / "shift", data.sites, data.positive, [i.path for i in test],
                     np.array([i.label for i in test], dtype=np.int64), subtype, out, replace(settings), manifest)


def _frontend_key(frontend: torch.nn.Module, size: int) -> str:
    return frontend.cache_spec(size)


def rendered_features(data: ShiftData, frontend: torch.nn.Module, split: str, *, task: str) -> dict[str, np.ndarray]:
    """{condition: float16 features [N, C, h, w]} of the split under every condition, and ``__y__`` the targets.

    ``test``: the held-out source images rendered at their own resolution, then resized to the model's input.
    ``val``: every site's validation images (the 64-px copies the sites train on) rendered at 64 px.
    """
    size = data.settings.image_size
    folder = data.work / "features" / _frontend_key(frontend, size)
    tag = split if task == "binary" else f"{split}-{task}"
    if split == "test":
        y = data.test_y if task == "binary" else data.test_subtype
        sources: list[np.ndarray] | None = None
    else:
        sites = data.sites if task == "binary" else data.multiclass_sites()
        y = np.concatenate([d.targets.y[d.split.val, 0] if task == "binary" else d.targets.y[d.split.val]
                            for d in sites.values()]).astype(np.int64)
        sources = [img.astype(np.float32) / 255.0 for d in sites.values() for img in d.images[d.split.val]]
    out: dict[str, np.ndarray] = {"__y__": np.asarray(y)}
    for cond in CONDITIONS:
        path = folder / f"{tag}-{cond.name}.npy"
        if path.is_file():
            feats = np.load(path, mmap_mode="r")
            if len(feats) == len(y):
                out[cond.name] = feats
                continue
        pixels = sources if sources is not None else [load_pixels(p) for p in data.test_paths]
        x = np.stack([to_model_input(render(cond, img, seed=i), size)[0] for i, img in enumerate(pixels)])
        chunks = []
        with torch.no_grad():
            for s in range(0, len(x), 32):
                chunks.append(frontend(torch.from_numpy(np.ascontiguousarray(x[s:s + 32]))).numpy().astype(np.float16))
        feats = np.concatenate(chunks)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, feats)
        tmp.replace(path)
        out[cond.name] = feats
        (folder / "spec.json").write_text(json.dumps({"spec": _frontend_key(frontend, size)}))
    return out
