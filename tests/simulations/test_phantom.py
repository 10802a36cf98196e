"""Tests for simulations/phantom.py: the synthetic chest radiograph."""

from __future__ import annotations

import numpy as np

from simulations.phantom import Opacity, follow_up, render_phantom, sample_anatomy, sample_opacity

SHAPE = (128, 112)


def _render(seed: int, opacity: Opacity | None = None, **kwargs: object) -> np.ndarray:
    rng = np.random.default_rng(seed)
    anatomy = sample_anatomy(rng)
    return render_phantom(anatomy, SHAPE, rng, opacity=opacity, **kwargs)  # type: ignore[arg-type]


class TestRenderPhantom:
    def test_shape_dtype_range(self) -> None:
        img = _render(0)
        assert img.shape == SHAPE and img.dtype == np.float32
        assert 0.0 <= img.min() and img.max() <= 1.0
        assert img.std() > 0.1  # not a flat image

    def test_same_seed_same_pixels(self) -> None:
        assert _render(3).tobytes() == _render(3).tobytes()
        assert _render(3).tobytes() != _render(4).tobytes()

    def test_anatomy_is_where_a_chest_has_it(self) -> None:
        img = _render(1, noise=0.0)
        rows, cols = SHAPE
        lung_band = img[int(rows * 0.35) : int(rows * 0.5)]
        left_lung = lung_band[:, int(cols * 0.2) : int(cols * 0.35)].mean()
        right_lung = lung_band[:, int(cols * 0.65) : int(cols * 0.8)].mean()
        spine = lung_band[:, cols // 2 - 2 : cols // 2 + 2].mean()
        corner_air = img[: rows // 10, : cols // 10].mean()
        abdomen = img[int(rows * 0.9) :, int(cols * 0.3) : int(cols * 0.7)].mean()
        assert corner_air < left_lung < spine  # air darkest, lungs dark, bone bright
        assert max(left_lung, right_lung) < abdomen

    def test_opacity_brightens_one_lung_only(self) -> None:
        rng = np.random.default_rng(5)
        anatomy = sample_anatomy(rng)
        opacity = Opacity(side=1, u=0.0, v=0.2, radius=0.15, intensity=0.2, lobes=())
        clean = render_phantom(anatomy, SHAPE, np.random.default_rng(0), noise=0.0)
        sick = render_phantom(anatomy, SHAPE, np.random.default_rng(0), opacity=opacity, noise=0.0)
        diff = sick - clean
        assert diff.min() >= -1e-6
        assert diff.max() > 0.1
        cols = SHAPE[1]
        # side=+1 is the patient's left lung = image right in a PA view
        assert diff[:, cols // 2 :].sum() > 20 * diff[:, : cols // 2].sum()

    def test_opacities_vary(self) -> None:
        rng = np.random.default_rng(0)
        drawn = [sample_opacity(rng) for _ in range(40)]
        assert {o.side for o in drawn} == {-1, 1}
        assert np.std([o.radius for o in drawn]) > 0.02
        assert np.std([o.intensity for o in drawn]) > 0.02


class TestFollowUp:
    def test_same_patient_slightly_changed(self) -> None:
        rng = np.random.default_rng(2)
        anatomy, opacity = sample_anatomy(rng), sample_opacity(rng)
        later, later_opacity = follow_up(anatomy, opacity, rng)
        assert later != anatomy and later_opacity != opacity
        assert later_opacity is not None and later_opacity.side == opacity.side
        first = render_phantom(anatomy, SHAPE, np.random.default_rng(0), opacity=opacity)
        second = render_phantom(later, SHAPE, np.random.default_rng(1), opacity=later_opacity)
        other = render_phantom(sample_anatomy(rng), SHAPE, np.random.default_rng(1))
        same = np.corrcoef(first.ravel(), second.ravel())[0, 1]
        assert same > 0.85
        assert same > np.corrcoef(first.ravel(), other.ravel())[0, 1]

    def test_negative_patient_stays_negative(self) -> None:
        rng = np.random.default_rng(2)
        _, lesion = follow_up(sample_anatomy(rng), None, rng)
        assert lesion is None
