"""The image check (common/ood.py): descriptor, score, DP reference and cut-off; its parity across runtimes."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from common.models import build_model
from common.onnx_export import ExportMetadataError, export_onnx, load_onnx_model
from common.ood import (
    HALF,
    ODDS_CAP,
    SCORE_EDGES,
    GateReference,
    OodError,
    OodScore,
    cutoff_from_histograms,
    descriptor_for,
    descriptors,
    layout_sign,
    noised_histogram,
    noised_sums,
    pool_reference,
)
from common.torchscript_export import export_torchscript, load_torchscript_model

META = {"model": "scatternet", "rounds": "2", "sites": "[]", "epsilon": "{}"}


@pytest.fixture(scope="module")
def scatternet():
    torch.manual_seed(0)
    model = build_model("scatternet", num_outputs=1)
    with torch.no_grad():
        model.head.classifier.weight.normal_(0.0, 0.01)
    return model


def _images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand((n, 1, 64, 64), generator=torch.Generator().manual_seed(seed))


def _phantom(seed: int) -> torch.Tensor:
    """[64, 64]: dark at the top, bright at the bottom, a bright patch top left (no half-turn or inversion
    maps it onto itself), noise of its own."""
    x = 0.2 + 0.5 * torch.linspace(0.0, 1.0, 64)[:, None] * torch.ones(64)
    x[8:24, 8:24] += 0.25
    return x + 0.2 * torch.rand(64, 64, generator=torch.Generator().manual_seed(seed))


class TestDescriptor:
    def test_unit_vectors_from_the_scattering_front_end(self, scatternet):
        d = descriptor_for(scatternet)
        assert d.order1 == (1, 17) and d.front_end is scatternet.scattering and d.grid == 4 and d.values == 48
        with torch.no_grad():
            u = d(_images(3))
        assert u.shape == (3, 48) and torch.allclose(u.norm(dim=1), torch.ones(3), atol=1e-5)
        # texture (16 + 16 values) and layout (16) each half of the unit length: one image still moves a sum by 1
        assert torch.allclose(u[:, :32].norm(dim=1), torch.full((3,), HALF), atol=1e-5)

    def test_cached_features_give_the_same_descriptors(self, scatternet):
        d = descriptor_for(scatternet)
        x = _images(4)
        with torch.no_grad():
            direct = d(x).double().numpy()
            feats = scatternet.scattering(x)
        assert np.allclose(descriptors(d, feats), direct, atol=1e-6)

    def test_brightness_and_contrast_do_not_change_it_but_rotation_does(self, scatternet):
        d = descriptor_for(scatternet)
        x = _images(2, seed=3) * 0.5
        with torch.no_grad():
            u, brighter, rotated = d(x), d(0.2 + 1.5 * x), d(torch.rot90(x, 1, dims=(2, 3)))
        assert torch.allclose(u, brighter, atol=2e-3)  # log energies and the layout are centred: a gain moves nothing
        assert (u - rotated).norm(dim=1).min() > 0.05

    def test_inversion_negates_the_layout_and_leaves_the_texture(self, scatternet):
        """Order-1 moduli of 1 - x equal those of x (the wavelets have zero mean); the local means change sign."""
        d = descriptor_for(scatternet)
        x = _images(3, seed=4)
        with torch.no_grad():
            u, inverted = d(x).double().numpy(), d(1.0 - x).double().numpy()
        assert np.allclose(inverted, u * layout_sign(48, 4), atol=2e-3)
        assert np.allclose(inverted[:, 32:], -u[:, 32:], atol=1e-4)

    def test_the_layout_sees_a_half_turn_that_the_texture_profile_does_not(self, scatternet):
        d = descriptor_for(scatternet)
        ramp = (torch.linspace(0.1, 0.9, 64)[:, None] * torch.ones(64))[None, None]
        with torch.no_grad():
            u, turned = d(ramp)[0], d(torch.rot90(ramp, 2, dims=(2, 3)))[0]
        assert torch.allclose(u[:16], turned[:16], atol=1e-3)  # the profile: orientation and scale only
        assert torch.dot(u[32:], turned[32:]) < -0.45  # the layout: bright rows at the bottom, then at the top

    def test_a_cnn_uses_its_penultimate_layer(self):
        model = build_model("mobilenet_v2", num_outputs=1)
        d = descriptor_for(model)
        with torch.no_grad():
            u = d(torch.rand((2, 1, 32, 32)))
        assert d.order1 is None and d.grid == 0 and u.shape == (2, 32)


class TestReference:
    def test_scores_in_numpy_equal_the_torch_module(self, scatternet):
        d = descriptor_for(scatternet)
        with torch.no_grad():
            u = d(_images(6)).double().numpy()
        ref = pool_reference([{"gate-sum": u.sum(0).tolist(), "gate-n": 6.0}])
        with torch.no_grad():
            torch_scores = OodScore(d, ref)(_images(6)).double().numpy()
            turned = d(torch.flip(_images(6), dims=(2, 3))).double().numpy()
        assert np.allclose(ref.scores(u, turned, grid=4), torch_scores, rtol=1e-4)
        assert ref.spread == pytest.approx(1 - float(np.square(u.mean(0)).sum()), abs=1e-6)

    def test_an_image_that_fits_better_turned_or_inverted_is_pushed_up_the_rest_keep_their_distance(self, scatternet):
        """The odds factor is 1 for the reference's own images and e^ODDS_CAP for their inverted or turned copies."""
        d = descriptor_for(scatternet)
        x = torch.stack([_phantom(i) for i in range(6)])[:, None]
        with torch.no_grad():
            u, turned = d(x).double().numpy(), d(torch.flip(x, dims=(2, 3))).double().numpy()
            inverted, inverted_turned = d(1.0 - x).double().numpy(), d(torch.flip(1.0 - x, dims=(2, 3))).double().numpy()
        ref = pool_reference([{"gate-sum": u.sum(0).tolist(), "gate-n": 6.0}])
        t_mean = np.asarray(ref.mean[:32]) / HALF
        distance = ((u[:, :32] / HALF - t_mean) ** 2).sum(1) / (1 - t_mean @ t_mean)
        assert np.allclose(ref.scores(u, turned, grid=4), distance, rtol=1e-9)
        cap = math.exp(ODDS_CAP)
        assert np.allclose(ref.scores(inverted, inverted_turned, grid=4), distance * cap, rtol=1e-2)
        turned_distance = ((turned[:, :32] / HALF - t_mean) ** 2).sum(1) / (1 - t_mean @ t_mean)
        assert np.allclose(ref.scores(turned, u, grid=4), turned_distance * cap)
        with pytest.raises(OodError, match="turned"):
            ref.scores(u, None, grid=4)

    def test_pooling_is_exact_and_ignores_order_and_sites_without_sums(self):
        rng = np.random.default_rng(0)
        parts = [{"gate-sum": rng.normal(size=32).tolist(), "gate-n": float(rng.integers(50, 200))} for _ in range(5)]
        forward = pool_reference([*parts, {"hist-pos": [1.0]}])
        assert forward == pool_reference(parts[::-1])
        assert pool_reference([{"hist-pos": [1.0]}]) is None

    def test_sites_with_other_descriptors_are_an_error(self):
        with pytest.raises(OodError, match="different models"):
            pool_reference([{"gate-sum": [0.1] * 32, "gate-n": 10.0}, {"gate-sum": [0.1] * 16, "gate-n": 10.0}])

    def test_json_round_trip_and_a_malformed_reference(self):
        ref = GateReference([0.5, 0.5], 0.5, 100.0)
        assert GateReference.from_json(ref.to_json()) == ref
        with pytest.raises(OodError):
            GateReference.from_json(json.dumps({"schema": "fedxray.gate-reference/2", "mean": [], "spread": 0.5, "n_images": 1}))
        with pytest.raises(OodError, match="schema"):  # a texture-only reference of an older coordinator
            GateReference.from_json(json.dumps({"schema": "fedxray.gate-reference/1", "mean": [0.5], "spread": 0.5, "n_images": 1}))
        with pytest.raises(OodError, match="another model"):
            ref.scores(np.zeros((2, 3)), None, grid=0)

    def test_a_reference_of_another_descriptor_cannot_build_the_score(self, scatternet):
        with pytest.raises(OodError, match="another model"):
            OodScore(descriptor_for(scatternet), GateReference([0.1] * 32, 0.5, 10.0))  # a /1 (texture-only) length

    def test_one_image_moves_the_sums_by_at_most_sqrt_2(self):
        """The noise is calibrated to this: a unit vector in the sum, 1 in the count."""
        rng = np.random.default_rng(1)
        u = rng.normal(size=(10, 32))
        u /= np.linalg.norm(u, axis=1, keepdims=True)
        a = noised_sums(u, 0.0, rng)
        b = noised_sums(u[1:], 0.0, rng)
        delta = np.r_[np.subtract(a["gate-sum"], b["gate-sum"]), a["gate-n"] - b["gate-n"]]
        assert np.linalg.norm(delta) == pytest.approx(math.sqrt(2))


class TestCutOff:
    def test_without_noise_the_98th_percentile_of_a_log_normal_is_recovered(self):
        rng = np.random.default_rng(0)
        scores = np.exp(rng.normal(0.0, 0.5, 20_000))
        cut = cutoff_from_histograms([noised_histogram(scores, 0.0, rng)], noise_sd=0.0)
        assert cut.q98 == pytest.approx(float(np.quantile(scores, 0.98)), rel=0.1)
        assert cut.cutoff == pytest.approx(3.0 * cut.q98) and cut.refused_estimate < 0.001

    def test_with_site_noise_the_cut_off_still_refuses_at_most_two_percent(self):
        """Five sites of ~180 validation images, noise std 7.07 per count (eval-noise 10): the refused share of
        the same images stays under 2% in every one of 20 draws of the noise."""
        rng = np.random.default_rng(2)
        sites = [np.exp(rng.normal(0.0, 0.45, 180)) for _ in range(5)]
        everything = np.concatenate(sites)
        for _ in range(20):
            cut = cutoff_from_histograms([noised_histogram(s, 10 / math.sqrt(2), rng) for s in sites], 10 / math.sqrt(2))
            assert float((everything > cut.cutoff).mean()) <= 0.02

    def test_too_few_images_is_an_error(self):
        rng = np.random.default_rng(3)
        with pytest.raises(OodError, match="too few"):
            cutoff_from_histograms([noised_histogram(np.ones(5), 7.0, rng)], 7.0)
        with pytest.raises(OodError, match="bins"):
            cutoff_from_histograms([[1.0, 2.0]], 1.0)

    def test_bins(self):
        assert SCORE_EDGES[0] == 0 and SCORE_EDGES[-1] == math.inf and len(SCORE_EDGES) == 21


class TestExportedScore:
    @pytest.fixture(scope="class")
    def exported(self, scatternet, tmp_path_factory):
        d = descriptor_for(scatternet)
        with torch.no_grad():
            u = d(_images(8, seed=5)).double().numpy()
        ref = pool_reference([{"gate-sum": u.sum(0).tolist(), "gate-n": 8.0}])
        ood = OodScore(d, ref)
        path = tmp_path_factory.mktemp("ood") / "model.onnx"
        meta = {**META, "ood": json.dumps({"schema": "fedxray.ood/1", "output": "ood_score", "cutoff": 4.0})}
        export_onnx(scatternet, path, task="binary", labels=["opacity"], input_size=(64, 64), threshold=0.5,
                    metadata=meta, ood=ood)
        export_torchscript(scatternet, path.with_suffix(".pt"), onnx_model=path, ood=ood)
        return path, ood

    def test_onnx_and_torchscript_scores_equal_torch(self, exported, scatternet):
        path, ood = exported
        x = _images(5, seed=9)
        with torch.no_grad():
            expected = ood(x).double().numpy()
        for model in (load_onnx_model(path), load_torchscript_model(path.with_suffix(".pt"))):
            got = model.ood_scores(x.numpy())
            assert got.shape == (5,)
            # float32: ~1e-6 relative after the log and the 32-term sums; 1e-4 leaves room for op order
            assert np.allclose(got, expected, rtol=1e-4, atol=1e-6)
            assert model.ood["cutoff"] == 4.0

    def test_the_contract_outputs_are_unchanged(self, exported, scatternet):
        path, _ = exported
        model = load_onnx_model(path)
        assert [o.name for o in model.session.get_outputs()] == ["probabilities", "ood_score"]
        assert [i.name for i in model.session.get_inputs()] == ["image"]
        x = _images(2).numpy()
        with torch.no_grad():
            expected = torch.sigmoid(scatternet(torch.from_numpy(x))).numpy()
        assert np.allclose(model.predict(x), expected, atol=1e-5)
        ts = load_torchscript_model(path.with_suffix(".pt"))
        assert ts.session.module(torch.from_numpy(x)).shape == (2, 1)  # forward still returns the probabilities

    def test_score_and_metadata_go_together(self, scatternet, tmp_path):
        d = descriptor_for(scatternet)
        ood = OodScore(d, GateReference([0.0] * 48, 1.0, 1.0))
        with pytest.raises(ExportMetadataError, match="go together"):
            export_onnx(scatternet, tmp_path / "m.onnx", task="binary", labels=["x"], input_size=(64, 64), threshold=0.5,
                        metadata=META, ood=ood)


class TestOnRealChests:
    """Kermany chest radiographs (FEDXRAY_DATA): a reference built the federation's way from 300 of them, without the
    DP noise; 40 others must stay below its cut-off as they are, and go above it inverted or upside down.

    The texture-only descriptor (before the layout) failed this: an inverted radiograph had the same score as the
    radiograph itself, and a half-turn moved it by a factor of about 3, under a cut-off of 3 x the 98th percentile."""

    @pytest.fixture(scope="class")
    def chests(self, fedxray_data):
        import csv

        from common.preprocess import load_pixels, to_model_input

        root = fedxray_data / "kermany-pneumonia"
        if not (root / "labels.csv").is_file():
            pytest.skip("kermany-pneumonia not found")
        rows = list(csv.DictReader((root / "labels.csv").open()))
        model = build_model("scatternet", num_outputs=1)

        def load(picked):
            return torch.from_numpy(np.stack([to_model_input(load_pixels(root / r["path"]), (64, 64))[0] for r in picked]))

        return model, load(rows[::17][:300]), load(rows[8::131][:40])

    def test_inverted_and_upside_down_chests_score_above_the_cut_off_that_chests_stay_below(self, chests):
        model, reference_images, others = chests
        d = descriptor_for(model)
        with torch.no_grad():
            u = d(reference_images).double().numpy()
            turned = d(torch.flip(reference_images, dims=(2, 3))).double().numpy()
        rng = np.random.default_rng(0)
        reference = pool_reference([noised_sums(u, 0.0, rng)])
        cut = cutoff_from_histograms([noised_histogram(reference.scores(u, turned, grid=d.grid), 0.0, rng)], 0.0)
        score = OodScore(d, reference)
        with torch.no_grad():
            upright = score(others).numpy()
            inverted = score(1.0 - others).numpy()
            upside_down = score(torch.rot90(others, 2, dims=(2, 3))).numpy()
        assert cut.refused_estimate <= 0.02
        assert (upright <= cut.cutoff).all(), np.sort(upright)[-3:]  # a chest scores about 1, the cut-off is ~8
        assert (inverted > cut.cutoff).all(), np.sort(inverted)[:3]
        assert (upside_down > cut.cutoff).sum() >= 38, np.sort(upside_down)[:4]
