"""One federated round at a site, without Flower: the site's privacy policy in one place.

The ClientApp (client/app.py) only turns Flower records into a :class:`RoundRequest` and a
:class:`RoundReply` back into records. Everything a hospital must be able to audit happens here,
in this order, for a training round:

1. the run config and the site's own settings are validated, and the site's data is read through
   the site cache (patient-level split);
2. a retry of a round already answered (same run, round and global weights) re-sends the stored
   reply: nothing new is released, nothing is charged;
3. DP: the site plans its own noise from its own training split size (client/privacy.py) and
   charges the round to its privacy ledger BEFORE training; a round past max-epsilon is refused;
4. local training (client/train.py): for a ScatterNet only the head trains, on fixed features
   cached at the site; DP noise and sampling come from the site's OS randomness;
5. the reply is stored (for retries) and returned: weights, the number of training images, the
   loss and epsilon. Nothing in it identifies a patient or a file.

Evaluation (:func:`evaluate_round`) scores the global model on the site's validation split.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from client.ledger import (
    BudgetExceeded,
    DeltaTooLargeError,
    LedgerConflictError,
    LedgerCorruptError,
    PrivacyLedger,
    dataset_fingerprint,
)
from client.privacy import plan_dp
from client.site import ReplyCache, resolve_device, weights_digest
from client.train import EvalStats, TrainSettings, evaluate, train_one_round
from common.config import RunConfig, SiteConfig
from common.loaders import SiteData, load_site
from common.models import build_model, grad_sample_mode, split_features

log = logging.getLogger(__name__)

# Why a round was refused; the ClientApp sends the code and the reason to the coordinator.
ERR_CONFIG, ERR_DATA, ERR_BUDGET, ERR_DP_REQUIRED, ERR_LEDGER = 4001, 4002, 4003, 4004, 4005


class RoundRefused(Exception):  # noqa: N818 - a refusal is an answer, not a crash
    """The site will not answer this round; ``reason`` is safe to send to the coordinator."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass(frozen=True)
class RoundRequest:
    """What the coordinator asks for: a round of a run, starting from ``weights``."""

    server_round: int
    weights: dict[str, torch.Tensor]
    run_name: str = "run"  # the coordinator's run name plus its random run id (client/app.py)
    proximal_mu: float = 0.0
    threshold: float = 0.5  # evaluation: the decision threshold the coordinator chose


@dataclass
class RoundReply:
    """A training reply: updated weights (the model's own keys) and plain metrics."""

    weights: dict[str, torch.Tensor]
    metrics: dict[str, float | int] = field(default_factory=dict)


def load_data(run: RunConfig, site: SiteConfig) -> SiteData:
    """The site's data for this run (through the site cache), or a refusal naming the problem."""
    from common.dataset import DatasetError

    try:
        return load_site(site.data_dir, site.state_dir, image_size=run.image_size, task=run.task, labels=run.labels,
                         val_fraction=run.val_fraction, seed=run.seed)
    except DatasetError as err:
        raise RoundRefused(ERR_DATA, f"site {site.site_name}: {err}") from err


def _model(run: RunConfig, weights: Mapping[str, torch.Tensor]) -> torch.nn.Module:
    model = build_model(run.model, dp=True, **run.model_kwargs())
    model.load_state_dict(dict(weights))
    return model


def train_settings(run: RunConfig, n_train: int, server_round: int, proximal_mu: float) -> TrainSettings:
    """The round's local training settings, from the run config and the site's training split size."""
    rate, batch = run.sampling(n_train)
    return TrainSettings(
        task=run.task, local_epochs=run.epochs_per_round(rate), batch_size=batch, learning_rate=run.learning_rate,
        optimizer=run.optimizer, momentum=run.momentum, proximal_mu=proximal_mu, dp=run.dp,
        max_grad_norm=run.max_grad_norm, grad_sample_mode=grad_sample_mode(run.model),
        seed=run.seed * 1000 + server_round,
    )


def _charge(run: RunConfig, site: SiteConfig, data: SiteData, settings: TrainSettings, request: RoundRequest,
            digest: str) -> tuple[TrainSettings, float, float]:
    """Plan this site's DP-SGD and record it in the ledger before training; (settings, eps round, eps total)."""
    delta = min(run.delta, site.delta)
    try:
        plan = plan_dp(n_train=data.n_train, batch_size=settings.batch_size, local_epochs=settings.local_epochs,
                       rounds=run.num_server_rounds, delta=delta, max_grad_norm=run.max_grad_norm,
                       noise_multiplier=run.noise_multiplier or None,
                       target_epsilon=None if run.noise_multiplier else run.target_epsilon)
    except ValueError as err:
        raise RoundRefused(ERR_CONFIG, f"site {site.site_name}: {err}") from err
    try:
        ledger = PrivacyLedger(site.state_dir, site=site.site_name, max_epsilon=site.max_epsilon, delta=site.delta)
        fingerprint = dataset_fingerprint(data.train_hashes())
        before = ledger.spent(fingerprint)
        entry = ledger.reserve(run_id=f"{request.run_name}@{digest[:12]}", round=request.server_round,
                               fingerprint=fingerprint, noise_multiplier=plan.noise_multiplier,
                               sample_rate=plan.sample_rate, steps=plan.steps_per_round,
                               max_grad_norm=plan.max_grad_norm, n_train=data.n_train, delta=delta)
    except BudgetExceeded as err:
        raise RoundRefused(ERR_BUDGET, f"site {site.site_name}: {err}") from err
    except (LedgerCorruptError, LedgerConflictError, DeltaTooLargeError) as err:
        raise RoundRefused(ERR_LEDGER, f"site {site.site_name}: privacy ledger: {err}") from err
    settings = replace(settings, noise_multiplier=plan.noise_multiplier, steps=plan.steps_per_round)
    return settings, max(0.0, entry.epsilon_after - before), entry.epsilon_after


def train_round(run: RunConfig, site: SiteConfig, request: RoundRequest, *, progress: bool = False) -> RoundReply:
    """Answer one training round (see the module docstring for the order of the steps)."""
    data = load_data(run, site)
    digest = weights_digest(request.weights)
    replies = ReplyCache(site.state_dir, request.run_name)
    cached = replies.get(request.server_round, digest)
    if cached is not None:
        log.info("round %d: same global model as an earlier attempt; re-sending that reply (no new privacy spent)",
                 request.server_round)
        return RoundReply(cached["weights"], cached["metrics"])
    if not run.dp and not site.allow_no_dp:
        raise RoundRefused(ERR_DP_REQUIRED, f"site {site.site_name} trains only with DP (allow-no-dp is false); "
                           "the run asked for dp=false")

    settings = train_settings(run, data.n_train, request.server_round, request.proximal_mu)
    eps_round = eps_total = 0.0
    if run.dp:
        settings, eps_round, eps_total = _charge(run, site, data, settings, request, digest)

    model = _model(run, request.weights)
    frontend, trainable, prefix = split_features(model)
    if frontend is not None:
        train_set, _ = data.feature_datasets(frontend, progress=progress)
    else:
        train_set = data.train_dataset(augment=run.augment)
    trained, stats = train_one_round(trainable, train_set, settings, device=resolve_device(site.device), progress=progress)
    weights = {prefix + k: v for k, v in trained.items()}
    metrics: dict[str, float | int] = {
        "num-examples": stats.num_examples, "train-loss": stats.loss, "steps": stats.steps,
        "epsilon-round": eps_round, "epsilon-total": eps_total,
        "noise-multiplier": settings.noise_multiplier, "sample-rate": settings.batch_size / max(1, data.n_train),
        "train-seconds": stats.seconds,
    }
    replies.put(request.server_round, digest, {"weights": weights, "metrics": metrics})
    log.info("round %d: trained on %d images (%d steps), loss %.4f, epsilon %.3f (total %.3f)", request.server_round,
             stats.num_examples, stats.steps, stats.loss, eps_round, eps_total)
    return RoundReply(weights, metrics)


def evaluate_round(run: RunConfig, site: SiteConfig, request: RoundRequest) -> dict[str, Any]:
    """Validation metrics of the global model on the site's validation split (plus its training size)."""
    data = load_data(run, site)
    model = _model(run, request.weights)
    frontend, head, _ = split_features(model)
    device = resolve_device(site.device)
    if frontend is not None:
        _, val_set = data.feature_datasets(frontend)
        stats = evaluate(head, val_set, task=run.task, threshold=request.threshold, device=device)
    else:
        stats = evaluate(model, data.val_dataset(), task=run.task, threshold=request.threshold, device=device)
    return eval_metrics(stats, n_train=data.n_train)


def eval_metrics(stats: EvalStats, *, n_train: int) -> dict[str, Any]:
    """The evaluate reply's metrics; NaN where a metric is undefined (one class only)."""
    hist = stats.histograms or {"pos": [], "neg": []}
    return {
        "num-examples": stats.num_examples, "eval-loss": stats.loss, "auc": stats.auc,
        "sensitivity": stats.sensitivity, "specificity": stats.specificity, "num-positive": stats.num_positive,
        "hist-pos": [int(v) for v in hist["pos"]], "hist-neg": [int(v) for v in hist["neg"]],
        "n-train": n_train,
    }

