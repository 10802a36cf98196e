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
    SCORE_EDGES,
    GateReference,
    OodError,
    OodScore,
    cutoff_from_histograms,
    descriptor_for,
    descriptors,
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


class TestDescriptor:
    def test_unit_vectors_from_the_scattering_front_end(self, scatternet):
        d = descriptor_for(scatternet)
        assert d.order1 == (1, 17) and d.front_end is scatternet.scattering
        with torch.no_grad():
            u = d(_images(3))
        assert u.shape == (3, 32) and torch.allclose(u.norm(dim=1), torch.ones(3), atol=1e-5)

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
        assert torch.allclose(u, brighter, atol=2e-3)  # log energies are centred: a gain moves nothing
        assert (u - rotated).norm(dim=1).min() > 0.05

    def test_a_cnn_uses_its_penultimate_layer(self):
        model = build_model("mobilenet_v2", num_outputs=1)
        d = descriptor_for(model)
        with torch.no_grad():
            u = d(torch.rand((2, 1, 32, 32)))
        assert d.order1 is None and u.shape == (2, 32)


class TestReference:
    def test_scores_in_numpy_equal_the_torch_module(self, scatternet):
        d = descriptor_for(scatternet)
        with torch.no_grad():
            u = d(_images(6)).double().numpy()
        ref = pool_reference([{"gate-sum": u.sum(0).tolist(), "gate-n": 6.0}])
        with torch.no_grad():
            torch_scores = OodScore(d, ref)(_images(6)).double().numpy()
        assert np.allclose(ref.scores(u), torch_scores, rtol=1e-4)
        assert ref.spread == pytest.approx(1 - float(np.square(u.mean(0)).sum()), abs=1e-6)

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
            GateReference.from_json(json.dumps({"schema": "fedxray.gate-reference/1", "mean": [], "spread": 0.5, "n_images": 1}))
        with pytest.raises(OodError, match="another model"):
            ref.scores(np.zeros((2, 3)))

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
        ood = OodScore(d, GateReference([0.0] * 32, 1.0, 1.0))
        with pytest.raises(ExportMetadataError, match="go together"):
            export_onnx(scatternet, tmp_path / "m.onnx", task="binary", labels=["x"], input_size=(64, 64), threshold=0.5,
                        metadata=META, ood=ood)
