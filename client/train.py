"""Local training (DP-SGD or plain) and evaluation at one site: plain torch, no Flower.

The ClientApp translates Flower records into these calls; the simulations and benchmarks call
them directly. One round of local training is ``train_one_round``; it returns plain numbers.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from common import losses, metrics
from common.dp import PerSampleLoss, dp_step, dp_views_step, make_private, site_generator, unwrapped_state_dict
from common.dp_linear import PreparedViews
from common.views import FeatureViews

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainSettings:
    """What one round of local training needs (from the run config and the site's DP plan)."""

    task: str
    local_epochs: int
    batch_size: int
    learning_rate: float
    optimizer: str
    momentum: float = 0.9  # SGD only
    proximal_mu: float = 0.0  # FedProx: pull towards the round's global weights (0: off)
    dp: bool = True
    noise_multiplier: float = 0.0
    max_grad_norm: float = 1.0
    steps: int | None = None  # DP: exact number of Poisson-sampled steps (the ledger's count)
    grad_sample_mode: str = "hooks"
    seed: int = 0  # non-DP runs only: data order (DP sampling and noise come from the site's OS randomness)
    pos_weight: tuple[float, ...] = ()  # binary/multilabel: loss weight of each output's positives (run config pos-weight)


@dataclass(frozen=True)
class TrainStats:
    loss: float  # mean training loss over the round's batches
    num_examples: int  # training images at this site (n_train, not batches)
    steps: int
    seconds: float
    images_per_second: float


@dataclass(frozen=True)
class EvalStats:
    loss: float
    num_examples: int
    auc: float  # binary: ROC AUC; multiclass/multilabel: macro AUC
    sensitivity: float
    specificity: float
    threshold: float
    histograms: dict[str, list[int]]  # binary: per-class score histograms (metrics.EVAL_EDGES) for the pooled AUC
    num_positive: int


def criterion_for(task: str, pos_weight: tuple[float, ...] = ()) -> nn.Module:
    """Cross-entropy for multiclass (softmax); masked BCE on logits for binary/multilabel (common/losses.py)."""
    return losses.criterion_for(task, pos_weight)


def _optimizer(model: nn.Module, s: TrainSettings) -> torch.optim.Optimizer:
    trainable = [p for p in model.parameters() if p.requires_grad]
    if s.optimizer == "sgd":
        return torch.optim.SGD(trainable, lr=s.learning_rate, momentum=s.momentum)
    return torch.optim.Adam(trainable, lr=s.learning_rate)


def _proximal_pull(model: nn.Module, anchor: Mapping[str, torch.Tensor], lr: float, mu: float) -> None:
    """FedProx's proximal term as a decoupled step: w <- w - lr * mu * (w - w_global).

    Under DP-SGD the proximal gradient cannot go through the loss: Opacus privatises per-sample
    gradients of the data term only, so a loss term on the weights would be silently dropped.
    The pull does not touch data, so applying it after the private step is post-processing and
    costs no privacy.
    """
    with torch.no_grad():
        for name, p in model.named_parameters():
            ref = anchor.get(name)
            if ref is not None:
                p.sub_(lr * mu * (p - ref.to(p.device)))


def train_one_round(
    model: nn.Module,
    dataset: Dataset,
    settings: TrainSettings,
    *,
    device: torch.device,
    progress: bool = False,
) -> tuple[dict[str, torch.Tensor], TrainStats]:
    """Train ``model`` on ``dataset`` for one federated round; returns (weights, stats).

    DP: Poisson sampling with rate batch_size / n, per-sample clipping at ``max_grad_norm`` and
    Gaussian noise ``noise_multiplier * max_grad_norm``, for exactly ``settings.steps`` steps (the
    count the site's ledger recorded before training). Sampling and noise come from a generator
    seeded by the operating system (common.dp.site_generator), never from ``settings.seed``: two
    identical DP rounds release different noise, and nobody else can reproduce it. The returned
    weights carry the model's own keys (no Opacus prefix), on CPU.

    ``dataset`` may be a :class:`common.views.FeatureViews` (K views of each image's features):
    each image's loss is then the mean over its views, and under DP its gradient is that mean,
    clipped once (common.dp_linear), so privacy is accounted exactly as for one view. The loaders
    then sample image indices, and each step gathers the sampled images' views.
    """
    torch.manual_seed(settings.seed)
    model.to(device).train()
    n = len(dataset)  # type: ignore[arg-type]
    anchor = {k: v.detach().clone() for k, v in model.named_parameters()} if settings.proximal_mu > 0 else {}
    optimizer = _optimizer(model, settings)
    generator = torch.Generator().manual_seed(settings.seed)
    views = dataset if isinstance(dataset, FeatureViews) else None
    source = TensorDataset(torch.arange(n), views.y) if views is not None else dataset  # views: sample indices
    loader = DataLoader(source, batch_size=settings.batch_size, shuffle=True, generator=generator)
    crit = criterion_for(settings.task, settings.pos_weight)
    losses: list[float] = []
    seen = 0
    start = time.perf_counter()
    bar = None
    if settings.dp:
        pt = make_private(
            model, optimizer, loader, noise_multiplier=settings.noise_multiplier,
            max_grad_norm=settings.max_grad_norm, mode=settings.grad_sample_mode, criterion=crit,
            generator=site_generator(),
        )
        prepared = None
        if views is not None:
            fixed = model.linear_parts() if hasattr(model, "linear_parts") else None
            if fixed is None:
                raise ValueError("training on several views per image needs the ScatterNet's linear head; set views = 1")
            prepared = PreparedViews.build(fixed[0], views).to(device)
        steps = settings.steps or settings.local_epochs * max(1, math.ceil(n / settings.batch_size))
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=steps, desc="DP-SGD", unit="step", leave=False)
        done = 0
        while done < steps:
            for x, y in pt.data_loader:
                x, y = x.to(device), y.to(device)
                loss = dp_step(pt, x, y) if prepared is None else dp_views_step(pt, prepared, x, y)
                if settings.proximal_mu > 0:
                    _proximal_pull(pt.model._module, anchor, settings.learning_rate, settings.proximal_mu)
                if not math.isnan(loss):
                    losses.append(loss)
                seen += int(x.shape[0])
                done += 1
                if bar is not None:
                    bar.update(1)
                if done >= steps:
                    break
        weights = unwrapped_state_dict(pt)
        if hasattr(pt.model, "remove_hooks"):
            pt.model.remove_hooks()  # the caller's model is plain again for evaluation and export
    else:
        loss_fn = PerSampleLoss(crit)
        steps = 0
        fixed = model.linear_parts() if views is not None and hasattr(model, "linear_parts") else None
        prepared = PreparedViews.build(fixed[0], views).to(device) if fixed is not None else None
        for _ in range(settings.local_epochs):
            for x, y in loader:
                seen += int(x.shape[0])
                optimizer.zero_grad()
                if prepared is not None:  # a linear head: the inputs of every view were prepared once this round
                    order = torch.argsort(x)  # a full batch in index order is one slice of them, not a copy
                    logits = prepared.linear(fixed[1], x[order].to(device)).flatten(0, 1)  # type: ignore[index]
                    target = y[order].repeat_interleave(views.views, dim=0)  # type: ignore[union-attr]
                elif views is not None:  # every view of the sampled images; the loss is the mean over the views
                    logits = model(views.gather(x.numpy()).flatten(0, 1).to(device))
                    target = y.repeat_interleave(views.views, dim=0)
                else:
                    logits, target = model(x.to(device)), y
                loss = loss_fn(logits, target.to(device))
                loss.backward()
                optimizer.step()
                if settings.proximal_mu > 0:
                    _proximal_pull(model, anchor, settings.learning_rate, settings.proximal_mu)
                losses.append(float(loss.item()))
                steps += 1
        weights = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - start
    mean_loss = float(np.mean(losses)) if losses else float("nan")
    return weights, TrainStats(mean_loss, n, steps, seconds, seen / seconds if seconds > 0 else 0.0)


@torch.no_grad()
def predict(model: nn.Module, dataset: Dataset, *, device: torch.device, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities [N, C], targets) for a dataset; sigmoid or softmax by the target dtype."""
    model.to(device).eval()
    probs, targets = [], []
    for x, y in DataLoader(dataset, batch_size=batch_size):
        logits = model(x.to(device)).float().cpu()
        multiclass = y.dtype == torch.int64
        probs.append(torch.softmax(logits, 1) if multiclass else torch.sigmoid(logits))
        targets.append(y)
    if not probs:
        return np.zeros((0, 1), np.float32), np.zeros((0, 1), np.float32)
    return torch.cat(probs).numpy(), torch.cat(targets).numpy()


def evaluate(
    model: nn.Module, dataset: Dataset, *, task: str, threshold: float, device: torch.device
) -> EvalStats:
    """Validation metrics at this site; histograms let the coordinator pool AUC without raw scores."""
    probs, y = predict(model, dataset, device=device)
    n = int(len(y))
    if n == 0:
        return EvalStats(float("nan"), 0, float("nan"), float("nan"), float("nan"), threshold, {}, 0)
    eps = 1e-7
    if task in ("multiclass", "multilabel"):
        # One-vs-rest histograms per class / finding: the coordinator pools a macro AUC from them.
        onehot = np.eye(probs.shape[1], dtype=np.float32)[y] if task == "multiclass" else y
        if task == "multiclass":
            loss = float(-np.mean(np.log(np.clip(probs[np.arange(n), y], eps, 1.0))))
        else:
            p = np.clip(probs, eps, 1 - eps)
            loss = float(np.nanmean(-(y * np.log(p) + (1 - y) * np.log(1 - p))))  # NaN targets: masked findings
        hists: dict[str, list[int]] = {}
        for c in range(probs.shape[1]):
            known = ~np.isnan(onehot[:, c])
            h = metrics.score_histograms(onehot[known, c], probs[known, c], edges=metrics.EVAL_EDGES)
            hists[f"pos-{c}"], hists[f"neg-{c}"] = h["pos"], h["neg"]
        positives = int((np.nan_to_num(onehot, nan=0.0).max(axis=1) > 0.5).sum()) if task == "multilabel" else 0
        return EvalStats(loss, n, metrics.macro_auc(onehot, probs), float("nan"), float("nan"), threshold, hists, positives)
    known = ~np.isnan(y[:, 0])
    y, probs, n = y[known], probs[known], int(known.sum())
    p = np.clip(probs, eps, 1 - eps)
    loss = float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))) if n else float("nan")
    yt, score = y[:, 0], probs[:, 0]
    sens, spec = metrics.sens_spec(yt, score, threshold)
    hist = metrics.score_histograms(yt, score, edges=metrics.EVAL_EDGES)
    return EvalStats(loss, n, metrics.roc_auc(yt, score), sens, spec, threshold, hist, int(yt.sum()))
