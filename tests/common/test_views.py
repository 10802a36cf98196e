"""Tests for common.views (augmented views of training images) and their cache in common.loaders / common.cache."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common.loaders import load_site
from common.models import build_model, split_features
from common.views import VIEW_RECIPE, FeatureViews, gaussian_blur, render_views


@pytest.fixture(autouse=True, scope="module")
def _threads(one_torch_thread: None) -> None:
    """One torch thread (tests/conftest.py)."""


def _image(seed: int, size: int = 32) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = 0.6 + 0.3 * np.sin(6 * xx + seed) * np.cos(4 * yy) + rng.normal(0, 0.03, (size, size))
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def _keys(n: int) -> list[str]:
    return [hashlib.sha256(str(i).encode()).hexdigest() for i in range(n)]


class TestRenderViews:
    def test_views_are_a_function_of_the_content_hash_and_the_view(self) -> None:
        images = np.stack([_image(i) for i in range(3)])
        keys = _keys(3)
        first = render_views(images, keys, 4)
        assert first.shape == (3, 3, 32, 32) and first.dtype == np.float32
        assert 0.0 <= first.min() and first.max() <= 1.0
        # Order-free, up to float rounding of batched kernels.
        np.testing.assert_allclose(render_views(images[::-1], keys[::-1], 4), first[::-1], atol=1e-6, rtol=0)
        np.testing.assert_allclose(render_views(images[:1], keys[:1], 2)[0, 0], first[0, 0], atol=1e-6, rtol=0)
        assert not np.allclose(first[0, 0], first[0, 1])  # views differ
        assert not np.allclose(first[0, 0], images[0] / 255.0, atol=0.02)  # and differ from the image
        other = render_views(images[:1], [hashlib.sha256(b"x").hexdigest()], 2)
        assert not np.allclose(other[0, 0], first[0, 0])
        assert render_views(images, keys, 1).shape == (3, 0, 32, 32)

    def test_blur_is_per_image_and_zero_sigma_is_the_identity(self) -> None:
        x = torch.rand(2, 1, 16, 16)
        out = gaussian_blur(x, torch.tensor([0.0, 1.5]))
        torch.testing.assert_close(out[0], x[0])
        assert float(out[1].std()) < float(x[1].std())  # smoothed
        torch.testing.assert_close(out[1].mean(), x[1].mean(), atol=0.02, rtol=0.0)  # keeps brightness


class TestFeatureViews:
    def test_gather_puts_the_plain_view_first(self) -> None:
        plain = np.random.default_rng(0).random((5, 2, 3, 3)).astype(np.float32)
        extra = np.random.default_rng(1).random((5, 2, 2, 3, 3)).astype(np.float16)
        views = FeatureViews(plain, extra, np.arange(5, dtype=np.float32)[:, None])
        assert len(views) == 5 and views.views == 3
        batch = views.gather([4, 1])
        assert batch.shape == (2, 3, 2, 3, 3) and batch.dtype == torch.float32
        np.testing.assert_array_equal(batch[0, 0].numpy(), plain[4])
        np.testing.assert_array_equal(batch[1, 2].numpy(), extra[1, 1].astype(np.float32))
        x, y = views[1]
        assert torch.equal(x, batch[1]) and float(y[0]) == 1.0
        with pytest.raises(ValueError, match="targets"):
            FeatureViews(plain, extra[:4], np.zeros(5))


def _site(root: Path, n: int, start: int = 0) -> None:
    for i in range(start, start + n):
        folder = root / ("PNEUMONIA" if i % 2 else "NORMAL")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_image(i, 40)).save(folder / f"img{i}.png")


class TestViewsCache:
    def test_views_are_computed_once_kept_as_one_pack_and_reused_by_content(self, tmp_path: Path, monkeypatch) -> None:
        import common.loaders as loaders_mod

        root, state = tmp_path / "site", tmp_path / "state"
        _site(root, 10)
        frontend, _, _ = split_features(build_model("scatternet", num_outputs=1, image_size=32))
        data = load_site(root, state, image_size=32, task="binary", labels=("pneumonia",), val_fraction=0.2)
        views = data.feature_views(frontend, 3)
        assert len(views) == data.n_train and views.views == 3
        np.testing.assert_array_equal(views.plain, data.features(frontend)[data.split.train])
        spec = frontend.cache_spec(32)
        packs = sorted((data.cache.root / "features" / spec).glob(f"views-{VIEW_RECIPE}-k3-*"))
        assert [p.suffix for p in packs] == [".json", ".npy"]
        # The extra views are the front end of the rendered views, stored in float16.
        keys = [data.index.records[int(data.targets.keep[i])].content_hash for i in data.split.train]
        rendered = render_views(data.images[data.split.train[:2]], keys[:2], 3)
        with torch.no_grad():
            direct = frontend(torch.from_numpy(rendered.reshape(-1, 1, 32, 32))).numpy().reshape(2, 2, *views.plain.shape[1:])
        np.testing.assert_allclose(views.extra[:2].astype(np.float32), direct, rtol=2e-3, atol=1e-4)

        calls: list[int] = []
        real = loaders_mod.render_views
        monkeypatch.setattr(loaders_mod, "render_views", lambda imgs, ks, k: calls.append(len(ks)) or real(imgs, ks, k))
        again = load_site(root, state, image_size=32, task="binary", labels=("pneumonia",), val_fraction=0.2)
        np.testing.assert_array_equal(again.feature_views(frontend, 3).extra, views.extra)
        assert calls == []  # the pack answered
        _site(root, 4, start=10)  # new images: only the new training images are rendered
        grown = load_site(root, state, image_size=32, task="binary", labels=("pneumonia",), val_fraction=0.2)
        grown_views = grown.feature_views(frontend, 3)
        new_keys = [grown.index.records[int(grown.targets.keep[i])].content_hash for i in grown.split.train]
        assert sum(calls) == len(set(new_keys) - set(keys)) > 0
        for i, key in enumerate(new_keys):
            if key in keys:
                np.testing.assert_array_equal(grown_views.extra[i], views.extra[keys.index(key)])
        assert len(list((grown.cache.root / "features" / spec).glob(f"views-{VIEW_RECIPE}-k3-*.npy"))) == 1
