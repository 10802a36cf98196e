"""Local training and evaluation: DP-SGD steps as planned, FedProx pull, evaluation histograms."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from client.train import TrainSettings, evaluate, train_one_round
from common import metrics
from common.loaders import XrayDataset
from common.models import build_model, grad_sample_mode

CPU = torch.device("cpu")


def _data(n: int = 32, size: int = 32, seed: int = 0) -> XrayDataset:
    rng = np.random.default_rng(seed)
    imgs = rng.integers(40, 90, size=(n, size, size)).astype(np.uint8)
    y = (np.arange(n) % 2).astype(np.float32)[:, None]
    imgs[y[:, 0] == 1, 8:20, 8:20] = 220  # positives carry a bright blob
    return XrayDataset(imgs, y)


def _settings(**kw) -> TrainSettings:
    base = dict(task="binary", local_epochs=1, batch_size=8, learning_rate=1e-3, optimizer="adam",
                dp=True, noise_multiplier=1.0, max_grad_norm=1.0, steps=3, grad_sample_mode=grad_sample_mode("mobilenet_v2"))
    base.update(kw)
    return TrainSettings(**base)


def test_dp_round_runs_exact_steps_and_keeps_keys():
    model = build_model("mobilenet_v2", num_outputs=1, dp=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    weights, stats = train_one_round(model, _data(), _settings(), device=CPU)
    assert set(weights) == set(before)
    assert stats.steps == 3 and stats.num_examples == 32 and np.isfinite(stats.loss)
    changed = sum(not torch.equal(weights[k], before[k]) for k in before if before[k].is_floating_point())
    assert changed > 10


def test_dp_noise_comes_from_the_site_not_the_seed():
    """Two DP rounds from the same weights with the same seed release different noise (the coordinator
    sets the seed, so a seeded noise would be reproducible by it); a non-DP round stays reproducible."""
    def round_weights(dp: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = build_model("scatternet", num_outputs=1, image_size=32)
        head_data = torch.utils.data.TensorDataset(torch.rand(32, 81, 8, 8, generator=torch.Generator().manual_seed(1)),
                                                   (torch.arange(32) % 2).float()[:, None])
        w, _ = train_one_round(model.head, head_data, _settings(dp=dp, seed=7, optimizer="sgd", learning_rate=1.0,
                                                                max_grad_norm=0.1, grad_sample_mode="hooks"), device=CPU)
        return w

    a, b = round_weights(True), round_weights(True)
    assert not torch.equal(a["classifier.weight"], b["classifier.weight"])
    c, d = round_weights(False), round_weights(False)
    assert torch.equal(c["classifier.weight"], d["classifier.weight"])


def test_fedprox_pull_keeps_weights_near_global():
    def distance(mu: float) -> float:
        torch.manual_seed(0)
        model = build_model("mobilenet_v2", num_outputs=1, dp=False)
        start = {k: v.clone() for k, v in model.state_dict().items()}
        w, _ = train_one_round(model, _data(), _settings(dp=False, proximal_mu=mu, learning_rate=0.05, optimizer="sgd"),
                               device=CPU)
        return sum(float((w[k] - start[k]).float().norm()) for k in start if start[k].is_floating_point())

    assert distance(10.0) < distance(0.0)


def test_evaluate_histograms_and_metrics():
    model = build_model("mobilenet_v2", num_outputs=1, dp=True)
    stats = evaluate(model, _data(20), task="binary", threshold=0.5, device=CPU)
    assert stats.num_examples == 20 and stats.num_positive == 10
    assert sum(stats.histograms["pos"]) == 10 and sum(stats.histograms["neg"]) == 10
    assert len(stats.histograms["pos"]) == len(metrics.EVAL_EDGES) - 1
    # The histograms reproduce the site's own AUC up to ties within a bin.
    assert abs(metrics.pooled_auc_from_histograms([stats.histograms]) - stats.auc) < 0.1
    assert np.isfinite(stats.loss)


@pytest.mark.parametrize("task,n_out", [("multilabel", 3), ("multiclass", 3)])
def test_other_tasks_train_and_evaluate(task, n_out):
    rng = np.random.default_rng(1)
    imgs = rng.integers(0, 255, size=(24, 32, 32)).astype(np.uint8)
    if task == "multiclass":
        y = (np.arange(24) % 3).astype(np.int64)
    else:
        y = (rng.random((24, 3)) > 0.5).astype(np.float32)
    ds = XrayDataset(imgs, y)
    model = build_model("mobilenet_v2", num_outputs=n_out, dp=True)
    weights, stats = train_one_round(model, ds, _settings(task=task, steps=2), device=CPU)
    assert np.isfinite(stats.loss)
    ev = evaluate(model, ds, task=task, threshold=0.5, device=CPU)
    assert 0.0 <= ev.auc <= 1.0


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_multilabel_with_masked_findings_under_dp(mode):
    """NaN targets (uncertain / unlabelled findings) train under DP-SGD and are left out of the histograms."""
    rng = np.random.default_rng(2)
    x = torch.from_numpy(rng.normal(size=(24, 6)).astype(np.float32))
    y = (rng.random((24, 3)) > 0.5).astype(np.float32)
    y[::3, 1] = np.nan
    y[:, 2] = np.nan  # a finding this site does not label
    ds = torch.utils.data.TensorDataset(x, torch.from_numpy(y))
    model = torch.nn.Linear(6, 3)
    weights, stats = train_one_round(model, ds, _settings(task="multilabel", grad_sample_mode=mode), device=CPU)
    assert stats.steps == 3 and all(torch.isfinite(v).all() for v in weights.values())
    ev = evaluate(model, ds, task="multilabel", threshold=0.5, device=CPU)
    assert sum(ev.histograms["pos-1"]) + sum(ev.histograms["neg-1"]) == 16
    assert sum(ev.histograms["pos-2"]) + sum(ev.histograms["neg-2"]) == 0 and np.isfinite(ev.loss)


def test_pos_weight_from_the_run_config_reaches_the_loss():
    """run config pos-weight -> the round's TrainSettings -> the loss: weighted positives pull the outputs up."""
    from client.round import train_settings
    from common.config import RunConfig

    run = RunConfig.from_mapping({"task": "multilabel", "labels": "a,b,c", "pos-weight": "5", "dp": False})
    assert train_settings(run, 24, 1, 0.0).pos_weight == (5.0, 5.0, 5.0)
    rng = np.random.default_rng(3)
    ds = torch.utils.data.TensorDataset(torch.from_numpy(rng.normal(size=(24, 6)).astype(np.float32)),
                                        torch.from_numpy((rng.random((24, 3)) > 0.5).astype(np.float32)))

    def bias(pos_weight: tuple[float, ...]) -> torch.Tensor:
        torch.manual_seed(0)
        w, _ = train_one_round(torch.nn.Linear(6, 3), ds, _settings(task="multilabel", dp=False, optimizer="sgd", learning_rate=0.5,
                                                                  momentum=0.0, seed=7, pos_weight=pos_weight), device=CPU)
        return w["bias"]

    assert (bias((5.0, 5.0, 5.0)) > bias(()) + 0.1).all()


class TestViews:
    """Training on K views per image (common/views.py): the loss of an image is the mean over its views."""

    @staticmethod
    def _views(n: int = 10, k: int = 3, seed: int = 0):
        from common.views import FeatureViews

        g = torch.Generator().manual_seed(seed)
        x = torch.rand(n, k, 81, 4, 4, generator=g)
        y = (torch.arange(n) % 2).float()[:, None]
        return FeatureViews(x[:, 0].numpy(), x[:, 1:].numpy().astype(np.float16), y.numpy())

    @staticmethod
    def _head(seed: int = 1):
        torch.manual_seed(seed)
        head = build_model("scatternet", num_outputs=1, image_size=16).head
        torch.nn.init.normal_(head.classifier.weight, std=0.05)
        return head

    def test_without_dp_a_full_batch_step_is_the_mean_over_every_view(self):
        """The prepared-inputs path against plain training on every (image, view) row as its own sample."""
        from torch.utils.data import TensorDataset

        views = self._views()
        settings = _settings(dp=False, optimizer="sgd", learning_rate=0.5, momentum=0.0, batch_size=10, steps=None)
        ours, stats = train_one_round(self._head(), views, settings, device=CPU)
        rows = views.gather(range(10))
        flat = TensorDataset(rows.flatten(0, 1), views.y.repeat_interleave(3, dim=0))
        reference, _ = train_one_round(self._head(), flat, replace(settings, batch_size=30), device=CPU)
        for key in ours:
            torch.testing.assert_close(ours[key], reference[key], rtol=1e-5, atol=1e-7)
        assert stats.steps == 1 and stats.num_examples == 10

    def test_dp_without_noise_or_clipping_takes_the_same_step(self):
        views = self._views()
        plain = _settings(dp=False, optimizer="sgd", learning_rate=0.5, momentum=0.0, batch_size=10, steps=None)
        expected, _ = train_one_round(self._head(), views, plain, device=CPU)
        private = replace(plain, dp=True, noise_multiplier=0.0, max_grad_norm=1e6, steps=1, grad_sample_mode="hooks")
        got, stats = train_one_round(self._head(), views, private, device=CPU)
        assert stats.steps == 1
        for key in got:
            torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-7)
