"""One federated round at a site, without Flower: the site's privacy policy in one place.

The ClientApp (client/app.py) only turns Flower records into a :class:`RoundRequest` and a
:class:`RoundReply` back into records. Everything a hospital must be able to audit happens here,
in this order, for a training round:

1. the run config is checked against the ranges this site accepts (node config), and the global
   weights against the model (keys, shapes, finite values), before anything is read or charged;
2. the site's data is read through the site cache; the patient-level split is the site's own
   (its salt and val-fraction, nothing the coordinator sets);
3. under one site-wide lock from here to the stored reply: a retry of a round already answered
   (same run, round and global weights) re-sends the stored reply, so nothing new is released
   and nothing is charged, and two concurrent messages cannot release two updates;
4. DP: the site plans its own noise from its own training split size (common/privacy.py) and
   charges the round to the budget of every training patient in its ledger BEFORE training; a
   round that would take any patient past max-epsilon is refused;
5. local training (client/train.py): for a ScatterNet only the head trains, on fixed features
   cached at the site; DP noise and sampling come from the site's OS randomness;
6. the reply is stored (for retries) and returned: weights, the number of training images, the
   number of steps and epsilon. Under DP no training loss is sent (it is not covered by the DP
   accounting). Nothing in it identifies a patient or a file.

Evaluation (:func:`evaluate_round`) scores the global model on the site's validation split and
releases only score histograms with Gaussian noise added (the site's eval-noise), charged to the
validation patients' budget, at most max-evaluations times per run. docs/privacy.md lists what
leaves a site per message and what each costs.
"""

from __future__ import annotations

import fcntl
import logging
import math
import secrets
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from client.ledger import (
    BudgetExceeded,
    DeltaTooLargeError,
    LedgerConflictError,
    LedgerCorruptError,
    PrivacyLedger,
    dataset_fingerprint,
)
from client.site import ReplyCache, resolve_device, weights_digest
from client.train import EvalStats, TrainSettings, evaluate, train_one_round
from common import metrics as metrics_lib
from common import reference
from common.audit import audit_path, try_record
from common.config import RunConfig
from common.loaders import SiteData, load_site
from common.models import build_model, grad_sample_mode, split_features
from common.privacy import accountant_cache, plan_dp
from common.site_config import SiteConfig

log = logging.getLogger(__name__)

# Why a round was refused; the ClientApp sends the code and the reason to the coordinator.
ERR_CONFIG, ERR_DATA, ERR_BUDGET, ERR_DP_REQUIRED, ERR_LEDGER, ERR_WEIGHTS = 4001, 4002, 4003, 4004, 4005, 4006


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
    reference: bool = False  # evaluation: also send noised image statistics for the drift reference (last round)


@dataclass
class RoundReply:
    """A training reply: updated weights (the model's own keys) and plain metrics."""

    weights: dict[str, torch.Tensor]
    metrics: dict[str, float | int] = field(default_factory=dict)


def load_data(run: RunConfig, site: SiteConfig) -> SiteData:
    """The site's data for this run (through the site cache), or a refusal safe to send.

    The coordinator gets one line without paths or class names; the details go to the site's log.
    """
    from common.dataset import DatasetError

    try:
        data = load_site(site.data_dir, site.state_dir, image_size=run.image_size, task=run.task, labels=run.labels,
                         val_fraction=site.val_fraction, policy=site.label_policy(run))
        known = {c.lower() for c in data.index.class_names}
        unknown = [lab for lab in run.labels if lab.lower() not in known]
        if unknown and any("neither a run label" in reason for reason in data.targets.dropped):
            # The site labels its images with other names: training would see one class only.
            raise DatasetError(f"the run's label(s) {', '.join(unknown)} are not among this site's classes "
                               f"({', '.join(data.index.class_names)})")
        return data
    except DatasetError as err:
        log.error("site data cannot be used for this run: %s", err)
        raise RoundRefused(ERR_DATA, f"site {site.site_name}: its data folder cannot be used for this run "
                           "(task or labels not found, or no readable images); the site's log and "
                           "`fl-client check` say why") from err


def check_request(run: RunConfig, site: SiteConfig, weights: Mapping[str, torch.Tensor]) -> torch.nn.Module:
    """Refuse a run outside the site's accepted ranges or global weights that do not fit; the model on success."""
    problems = site.refusals(run)
    if problems:
        raise RoundRefused(ERR_CONFIG, f"site {site.site_name} refuses this run: " + "; ".join(problems))
    model = build_model(run.model, dp=True, **run.model_kwargs())
    expected = model.state_dict()
    if set(weights) != set(expected):
        raise RoundRefused(ERR_WEIGHTS, f"site {site.site_name}: the global weights do not fit model {run.model} "
                           f"({len(set(expected) - set(weights))} missing, {len(set(weights) - set(expected))} unexpected keys)")
    for key, tensor in weights.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise RoundRefused(ERR_WEIGHTS, f"site {site.site_name}: global weight {key} has shape "
                               f"{tuple(tensor.shape)}, the model needs {tuple(expected[key].shape)}")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise RoundRefused(ERR_WEIGHTS, f"site {site.site_name}: global weight {key} holds NaN or Inf; "
                               "nothing was trained or charged")
    model.load_state_dict(dict(weights))
    return model


@contextmanager
def site_lock(state_dir: Path) -> Iterator[None]:
    """One round at a time per site: the reply-cache check, the ledger and the stored reply are atomic."""
    state_dir.mkdir(parents=True, exist_ok=True)
    with open(state_dir / "round.lock", "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def train_settings(run: RunConfig, n_train: int, server_round: int, proximal_mu: float) -> TrainSettings:
    """The round's local training settings, from the run config and the site's training split size."""
    rate, batch = run.sampling(n_train)
    return TrainSettings(
        task=run.task, local_epochs=run.epochs_per_round(rate), batch_size=batch, learning_rate=run.learning_rate,
        optimizer=run.optimizer, momentum=run.momentum, proximal_mu=proximal_mu, dp=run.dp,
        max_grad_norm=run.max_grad_norm, grad_sample_mode=grad_sample_mode(run.model, run.train_part),
        seed=run.seed * 1000 + server_round, pos_weight=run.pos_weights,
    )


def _ledger(site: SiteConfig) -> PrivacyLedger:
    try:
        return PrivacyLedger(site.state_dir, site=site.site_name, max_epsilon=site.max_epsilon, delta=site.delta)
    except LedgerCorruptError as err:
        raise RoundRefused(ERR_LEDGER, f"site {site.site_name}: privacy ledger: {err}") from err


def _charge(run: RunConfig, site: SiteConfig, data: SiteData, settings: TrainSettings, request: RoundRequest,
            digest: str) -> tuple[TrainSettings, float, float]:
    """Plan this site's DP-SGD and record it in the ledger before training; (settings, eps round, eps total)."""
    if settings.local_epochs > site.max_local_epochs:
        raise RoundRefused(ERR_CONFIG, f"site {site.site_name} refuses this run: {settings.local_epochs} local epochs "
                           f"per round, this site accepts at most {site.max_local_epochs} (node config max-local-epochs)")
    delta = min(run.delta, site.delta)
    try:
        plan = plan_dp(n_train=data.n_train, batch_size=settings.batch_size, local_epochs=settings.local_epochs,
                       rounds=run.num_server_rounds, delta=delta, max_grad_norm=run.max_grad_norm,
                       noise_multiplier=run.noise_multiplier or None,
                       target_epsilon=None if run.noise_multiplier else run.target_epsilon,
                       cache=accountant_cache(site.state_dir))
    except ValueError as err:
        raise RoundRefused(ERR_CONFIG, f"site {site.site_name}: {err}") from err
    ledger = _ledger(site)
    try:
        entry = ledger.reserve(run_id=f"{request.run_name}@{digest[:12]}", round=request.server_round,
                               fingerprint=dataset_fingerprint(data.train_hashes()),
                               noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate,
                               steps=plan.steps_per_round, max_grad_norm=plan.max_grad_norm, n_train=data.n_train,
                               delta=delta, patients=data.patients("train"))
    except BudgetExceeded as err:
        raise RoundRefused(ERR_BUDGET, f"site {site.site_name}: {err}") from err
    except (LedgerCorruptError, LedgerConflictError, DeltaTooLargeError) as err:
        raise RoundRefused(ERR_LEDGER, f"site {site.site_name}: privacy ledger: {err}") from err
    settings = replace(settings, noise_multiplier=plan.noise_multiplier, steps=plan.steps_per_round)
    return settings, plan.epsilon_per_round, entry.epsilon_after


def train_round(run: RunConfig, site: SiteConfig, request: RoundRequest, *, progress: bool = False) -> RoundReply:
    """Answer one training round (see the module docstring); every answer and refusal goes to the site's audit log."""
    try:
        reply = _train_round(run, site, request, progress=progress)
    except RoundRefused as err:
        try_record(audit_path(site.state_dir), "round-refused", run=request.run_name, round=request.server_round,
                   step="train", code=err.code, reason=err.reason)
        raise
    m = reply.metrics
    try_record(audit_path(site.state_dir), "round-trained", run=request.run_name, round=request.server_round,
               epsilon_round=m.get("epsilon-round"), epsilon_total=m.get("epsilon-total"),
               images=m.get("num-examples"), dp=run.dp)
    return reply


def _train_round(run: RunConfig, site: SiteConfig, request: RoundRequest, *, progress: bool = False) -> RoundReply:
    model = check_request(run, site, request.weights)
    if not run.dp and not site.allow_no_dp:
        raise RoundRefused(ERR_DP_REQUIRED, f"site {site.site_name} trains only with DP (allow-no-dp is false); "
                           "the run asked for dp=false")
    data = load_data(run, site)
    digest = weights_digest(request.weights)
    with site_lock(site.state_dir):
        replies = ReplyCache(site.state_dir, request.run_name)
        cached = replies.get(request.server_round, digest)
        if cached is not None:
            log.info("round %d: same global model as an earlier attempt; re-sending that reply (no new privacy spent)",
                     request.server_round)
            return RoundReply(cached["weights"], cached["metrics"])
        settings = train_settings(run, data.n_train, request.server_round, request.proximal_mu)
        eps_round = eps_total = 0.0
        if run.dp:
            settings, eps_round, eps_total = _charge(run, site, data, settings, request, digest)
        frontend, trainable, prefix = split_features(model)
        if frontend is not None and run.feature_views > 1:  # augmentation multiplicity (common/views.py)
            train_set = data.feature_views(frontend, run.feature_views, progress=progress)
        elif frontend is not None:
            train_set = data.feature_dataset(frontend, "train", progress=progress)
        else:
            train_set = data.train_dataset(augment=run.augment)
        trained, stats = train_one_round(trainable, train_set, settings, device=resolve_device(site.device),
                                         progress=progress)
        weights = {prefix + k: v for k, v in trained.items()}
        metrics: dict[str, float | int] = {
            "num-examples": stats.num_examples, "steps": stats.steps,
            "epsilon-round": eps_round, "epsilon-total": eps_total,
            "noise-multiplier": settings.noise_multiplier, "sample-rate": settings.batch_size / max(1, data.n_train),
            "local-epochs": settings.local_epochs, "train-seconds": stats.seconds,
        }
        if not run.dp:
            metrics["train-loss"] = stats.loss  # without DP nothing is accounted anyway
        replies.put(request.server_round, digest, {"weights": weights, "metrics": metrics})
    log.info("round %d: trained on %d images (%d steps), loss %.4f, epsilon %.3f (total %.3f)", request.server_round,
             stats.num_examples, stats.steps, stats.loss, eps_round, eps_total)
    return RoundReply(weights, metrics)


def evaluate_round(run: RunConfig, site: SiteConfig, request: RoundRequest) -> dict[str, Any]:
    """Noised validation score histograms of the global model, charged to the validation patients (audited)."""
    try:
        out = _evaluate_round(run, site, request)
    except RoundRefused as err:
        try_record(audit_path(site.state_dir), "round-refused", run=request.run_name, round=request.server_round,
                   step="evaluate", code=err.code, reason=err.reason)
        raise
    try_record(audit_path(site.state_dir), "evaluation-answered", run=request.run_name, round=request.server_round,
               val_images=out.get("num-examples"), reference=request.reference)
    return out


def _evaluate_round(run: RunConfig, site: SiteConfig, request: RoundRequest) -> dict[str, Any]:
    model = check_request(run, site, request.weights)
    data = load_data(run, site)
    if data.n_val == 0:
        raise RoundRefused(ERR_DATA, f"site {site.site_name} has no validation patients for this task")
    digest = weights_digest(request.weights)
    with site_lock(site.state_dir):
        replies = ReplyCache(site.state_dir, request.run_name + "-evaluate")
        cached = replies.get(request.server_round, digest)
        if cached is not None:
            return dict(cached["metrics"])
        ledger = _ledger(site)
        run_prefix = f"{request.run_name}@"
        done = sum(1 for c in ledger.contributions() if c.kind == "evaluate" and c.run_id.startswith(run_prefix))
        if done >= site.max_evaluations:
            raise RoundRefused(ERR_BUDGET, f"site {site.site_name} has answered {done} evaluations of this run, its "
                               "limit (node config max-evaluations)")
        # One image moves one or two counts of each class's (one-vs-rest) histograms: sqrt(2) per class.
        noise = site.eval_noise / (metrics_lib.HISTOGRAM_SENSITIVITY * math.sqrt(run.num_outputs))
        try:
            ledger.reserve(run_id=f"{run_prefix}{digest[:12]}", round=request.server_round,
                           fingerprint=dataset_fingerprint(data.val_hashes()), noise_multiplier=noise, sample_rate=1.0,
                           steps=1, max_grad_norm=1.0, n_train=max(1, data.n_val), delta=site.delta,
                           patients=data.patients("val"), kind="evaluate")
        except BudgetExceeded as err:
            raise RoundRefused(ERR_BUDGET, f"site {site.site_name} (evaluation): {err}") from err
        except (LedgerConflictError, DeltaTooLargeError) as err:
            raise RoundRefused(ERR_LEDGER, f"site {site.site_name}: privacy ledger: {err}") from err
        frontend, head, _ = split_features(model)
        device = resolve_device(site.device)
        if frontend is not None:
            val_set = data.feature_dataset(frontend, "val")
            stats = evaluate(head, val_set, task=run.task, threshold=request.threshold, device=device)
        else:
            stats = evaluate(model, data.val_dataset(), task=run.task, threshold=request.threshold, device=device)
        out = eval_metrics(stats, site.eval_noise, n_train=data.n_train)
        if request.reference:
            out.update(_reference_counts(site, data, ledger, f"{run_prefix}{digest[:12]}", request.server_round))
        replies.put(request.server_round, digest, {"weights": {}, "metrics": out})
    return out


def _reference_counts(site: SiteConfig, data: SiteData, ledger: PrivacyLedger, run_id: str,
                      server_round: int) -> dict[str, list[float]]:
    """Noised statistics of the validation images for the drift reference, charged like an evaluation."""
    noise = site.eval_noise / reference.IMAGE_COUNTS_SENSITIVITY
    try:
        ledger.reserve(run_id=run_id + "-reference", round=server_round,
                       fingerprint=dataset_fingerprint(data.val_hashes()), noise_multiplier=noise, sample_rate=1.0,
                       steps=1, max_grad_norm=1.0, n_train=max(1, data.n_val), delta=site.delta,
                       patients=data.patients("val"), kind="reference")
    except BudgetExceeded:
        log.warning("no drift reference statistics this run: they would pass max-epsilon")
        return {}
    images = (data.images[data.split.val].astype(np.float32) / 255.0)
    counts = reference.noised_image_counts(images, site.eval_noise, np.random.default_rng(secrets.randbits(128)))
    return {f"ref-{name}": values for name, values in counts.items()}


def eval_metrics(stats: EvalStats, eval_noise: float, *, n_train: int) -> dict[str, Any]:
    """The evaluate reply: only the noised histograms (and their noised total), never an exact score or count.

    Binary: ``hist-pos`` / ``hist-neg``; multiclass and multilabel: one-vs-rest ``hist-pos-<c>`` /
    ``hist-neg-<c>`` per class or finding.
    """
    rng = np.random.default_rng(secrets.randbits(128))
    out: dict[str, Any] = {"eval-noise": float(eval_noise), "n-train": n_train}
    classes = sorted({k.split("-", 1)[1] for k in stats.histograms if "-" in k})
    pairs = [(f"-{c}", {"pos": stats.histograms[f"pos-{c}"], "neg": stats.histograms[f"neg-{c}"]}) for c in classes]
    if not pairs:
        pairs = [("", stats.histograms)]
    total = 0.0
    for suffix, hist in pairs:
        noised = metrics_lib.noised_histograms(hist, eval_noise, rng)
        out[f"hist-pos{suffix}"], out[f"hist-neg{suffix}"] = noised["pos"], noised["neg"]
        total = max(total, sum(noised["pos"]) + sum(noised["neg"]))
    out["num-examples"] = int(round(max(0.0, total)))
    return out
