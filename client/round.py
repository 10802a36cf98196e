"""One federated round at a site, without Flower: the site's privacy policy in one place.

The ClientApp (client/app.py) only turns Flower records into a :class:`RoundRequest` and a
:class:`RoundReply` back into records. Everything a hospital must be able to audit happens here,
in this order, for a training round:

1. the run config is checked against the ranges this site accepts (node config), its approved
   policy, the settings the run was pinned to at its first message and the round against the run's
   length (client/run_limits.py), and the global weights against the model (keys, shapes, finite
   values), before anything is read or charged;
2. the site's data is read through the site cache; the patient-level split is the site's own
   (its salt and val-fraction, nothing the coordinator sets);
3. under one site-wide lock from here to the stored reply: a retry of a round already answered
   (same run, round and full hash of the global weights) re-sends the stored reply byte for byte,
   so nothing new is released and nothing is charged; a round whose stored reply was pruned is a
   new release and is charged again (client/replies.py); two concurrent messages cannot release
   two updates;
4. DP: the site plans its own noise at a sampling rate the run config or its declared size fixes
   (client/sampling.py, common/privacy.py), refuses a plan past max-run-epsilon, and charges the
   round to the budget of every training patient in its ledger BEFORE training; a round that would
   take any patient past max-epsilon is refused;
5. local training (client/train.py): for a ScatterNet only the head trains, on fixed features
   cached at the site; DP noise and sampling come from the site's OS randomness;
6. the reply is stored (for retries) and returned: weights, the site's declared size as its weight,
   the plan (steps, rate, noise) and epsilon, none of which depends on how many images the run's
   filters select. Under DP no training loss is sent (it is not covered by the DP accounting).
   Nothing in it identifies a patient or a file. A refusal whose cause depends on the data (no or
   too few images fit the run, their patients' budget is spent) sends one text, the same whatever
   the cause.

Evaluation (:func:`evaluate_round`) scores the global model on the site's validation split and
releases only score histograms with Gaussian noise added (scaled from the site's eval-noise, most of
it spent on the final evaluation: client/eval_noise.py), charged to the validation patients'
budget, at most max-evaluations times per run and max-evaluations-per-day over all runs.
docs/privacy.md lists what leaves a site per message and what each costs.
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

from client.drift_release import drift_release
from client.eval_noise import finals_answered, histogram_noise
from client.gate_stats import gate_release
from client.ledger import (
    BudgetExceeded,
    DeltaTooLargeError,
    LedgerConflictError,
    LedgerCorruptError,
    PrivacyLedger,
    dataset_fingerprint,
)
from client.replies import ReplyStore, release_id
from client.run_limits import admission_problems, evaluation_problem, run_epsilon_problem
from client.sampling import SamplingRefused, loader_batch, planned_rate
from client.site import resolve_device, weights_digest
from client.train import EvalStats, TrainSettings, evaluate, train_one_round
from common import metrics as metrics_lib
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
    flower_run_id: int | None = None  # the launched (Flower) run the message came in: the site pins each run to one
    gate_stats: bool = False  # evaluation: also send the intended-use gate's reference sums (client/gate_stats.py)
    gate_reference: str = ""  # evaluation: the pooled gate reference (JSON); with `reference`, send the score histogram
    final: bool = False  # evaluation: the coordinator will export this model (the site decides what that changes)


@dataclass
class RoundReply:
    """A training reply: updated weights (the model's own keys) and plain metrics."""

    weights: dict[str, torch.Tensor]
    metrics: dict[str, float | int] = field(default_factory=dict)


def data_refusal(site: SiteConfig) -> RoundRefused:
    """The one refusal sent whenever the cause depends on the site's data or its patients' budget.

    Which images fit the run's task, labels and label column, how many, and how much budget their
    patients have left are facts about patients: a coordinator choosing filters must not read them
    from the wording or the code of a refusal, so every such refusal reads the same.
    """
    return RoundRefused(ERR_BUDGET, f"site {site.site_name} cannot answer this round: no or too few of its images fit "
                        "the run's task and labels, or their patients' privacy budget (max-epsilon) is spent; nothing "
                        "was released. The site's log, `fl-client check` and `fl-client status` say which")


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
        raise data_refusal(site) from err


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


def admit(run: RunConfig, site: SiteConfig, request: RoundRequest) -> None:
    """Refuse a message outside the site's limits, policy or the run's pinned settings (client/run_limits.py)."""
    problems = admission_problems(run, site, run_key=request.run_name, server_round=request.server_round,
                                  flower_run_id=request.flower_run_id)
    if problems:
        raise RoundRefused(ERR_CONFIG, f"site {site.site_name} refuses this run: " + "; ".join(problems))


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


def train_settings(run: RunConfig, n_train: int, server_round: int, proximal_mu: float, *,
                   rate: float | None = None) -> TrainSettings:
    """The round's local training settings, from the run config and the site's training split size.

    ``rate``: the DP round's planned sampling rate (client/sampling.py); batches of floor(rate * n_train).
    """
    rate, batch = run.sampling(n_train) if rate is None else (rate, loader_batch(rate, n_train))
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
            run_id: str, rate: float) -> tuple[TrainSettings, float, float]:
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
                       cache=accountant_cache(site.state_dir), sample_rate=rate)
    except ValueError as err:
        raise RoundRefused(ERR_CONFIG, f"site {site.site_name}: {err}") from err
    ledger = _ledger(site)
    over = run_epsilon_problem(plan, site, ledger, request.run_name)
    if over:
        raise RoundRefused(ERR_CONFIG, f"site {site.site_name} refuses this run: {over}")
    try:
        entry = ledger.reserve(run_id=run_id, round=request.server_round,
                               fingerprint=dataset_fingerprint(data.train_hashes()),
                               noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate,
                               steps=plan.steps_per_round, max_grad_norm=plan.max_grad_norm, n_train=data.n_train,
                               delta=delta, patients=data.patients("train"))
    except BudgetExceeded as err:
        raise data_refusal(site) from err  # the ledger logged the figures at the site
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
    admit(run, site, request)
    try:
        rate = planned_rate(run, site) if run.dp else None
    except SamplingRefused as err:
        raise RoundRefused(ERR_CONFIG, f"site {site.site_name} refuses this run: {err}") from err
    data = load_data(run, site)
    if rate is not None and loader_batch(rate, data.n_train) < 1:
        log.error("round %d: %d training images give no whole image per batch at rate %.4g", request.server_round,
                  data.n_train, rate)
        raise data_refusal(site)
    digest = weights_digest(request.weights)
    with site_lock(site.state_dir):
        replies = ReplyStore(site.state_dir, request.run_name, "train")
        cached = replies.get(request.server_round, digest)
        if cached is not None:
            log.info("round %d: same global model as an earlier attempt; re-sending that reply (no new privacy spent)",
                     request.server_round)
            return RoundReply(cached["weights"], cached["metrics"])
        settings = train_settings(run, data.n_train, request.server_round, request.proximal_mu, rate=rate)
        eps_round = eps_total = 0.0
        if run.dp:
            run_id = release_id(request.run_name, digest, replies.releases(request.server_round, digest))
            settings, eps_round, eps_total = _charge(run, site, data, settings, request, run_id, rate)
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
            "num-examples": max(1, site.declared_images), "steps": stats.steps,  # a declared size, not a count
            "epsilon-round": eps_round, "epsilon-total": eps_total,
            "noise-multiplier": settings.noise_multiplier, "sample-rate": rate or settings.batch_size / max(1, data.n_train),
            "local-epochs": settings.local_epochs,
        }
        if not run.dp:
            metrics["train-loss"] = stats.loss  # without DP nothing is accounted anyway
            metrics["train-seconds"] = stats.seconds  # under DP the time would tell the split's size
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
    admit(run, site, request)
    data = load_data(run, site)
    if data.n_val == 0:
        log.error("no validation patients for this run's task and labels")
        raise data_refusal(site)
    digest = weights_digest(request.weights)
    with site_lock(site.state_dir):
        replies = ReplyStore(site.state_dir, request.run_name, "evaluate")
        cached = replies.get(request.server_round, digest)
        if cached is not None:
            return dict(cached["metrics"])
        ledger = _ledger(site)
        too_many = evaluation_problem(site, ledger, request.run_name)
        if too_many:
            raise RoundRefused(ERR_BUDGET, f"site {site.site_name}: {too_many}")
        run_id = release_id(request.run_name, digest, replies.releases(request.server_round, digest))
        eval_noise, final = histogram_noise(site, request.final, finals_answered(ledger, f"{request.run_name}@"))
        # One image moves one or two counts of each class's (one-vs-rest) histograms: sqrt(2) per class.
        noise = eval_noise / (metrics_lib.HISTOGRAM_SENSITIVITY * math.sqrt(run.num_outputs))
        try:
            ledger.reserve(run_id=run_id, round=request.server_round,
                           fingerprint=dataset_fingerprint(data.val_hashes()), noise_multiplier=noise, sample_rate=1.0,
                           steps=1, max_grad_norm=1.0, n_train=max(1, data.n_val), delta=site.delta,
                           patients=data.patients("val"), kind="final-evaluate" if final else "evaluate")
        except BudgetExceeded as err:
            raise data_refusal(site) from err  # the ledger logged the figures at the site
        except (LedgerConflictError, DeltaTooLargeError) as err:
            raise RoundRefused(ERR_LEDGER, f"site {site.site_name}: privacy ledger: {err}") from err
        frontend, head, _ = split_features(model)
        device = resolve_device(site.device)
        if frontend is not None:
            val_set = data.feature_dataset(frontend, "val")
            stats = evaluate(head, val_set, task=run.task, threshold=request.threshold, device=device)
        else:
            stats = evaluate(model, data.val_dataset(), task=run.task, threshold=request.threshold, device=device)
        out = eval_metrics(stats, eval_noise)
        out["eval-final"] = float(final)
        if request.reference:
            out.update(drift_release(site, data, ledger, run_id, request.server_round))
        out.update(gate_release(site, data, ledger, model, run_name=request.run_name, run_id=run_id,
                                server_round=request.server_round, stats=request.gate_stats,
                                reference=request.gate_reference if request.reference else ""))
        replies.put(request.server_round, digest, {"weights": {}, "metrics": out})
    return out


def eval_metrics(stats: EvalStats, eval_noise: float) -> dict[str, Any]:
    """The evaluate reply: only the noised histograms (and their noised total), never an exact score or count.

    Binary: ``hist-pos`` / ``hist-neg``; multiclass and multilabel: one-vs-rest ``hist-pos-<c>`` /
    ``hist-neg-<c>`` per class or finding.
    """
    rng = np.random.default_rng(secrets.randbits(128))
    out: dict[str, Any] = {"eval-noise": float(eval_noise)}
    classes = sorted({k.split("-", 1)[1] for k in stats.histograms if "-" in k})
    pairs = [(f"-{c}", {"pos": stats.histograms[f"pos-{c}"], "neg": stats.histograms[f"neg-{c}"]}) for c in classes]
    if not pairs:  # binary: the wider bins of the operating point (common/pooled_metrics.py BINARY_EDGES)
        pairs = [("", {k: metrics_lib.merge_bins(stats.histograms[k], metrics_lib.EVAL_EDGES, metrics_lib.BINARY_EDGES)
                       for k in ("pos", "neg")})]
    total = 0.0
    for suffix, hist in pairs:
        noised = metrics_lib.noised_histograms(hist, eval_noise, rng)
        out[f"hist-pos{suffix}"], out[f"hist-neg{suffix}"] = noised["pos"], noised["neg"]
        total = max(total, sum(noised["pos"]) + sum(noised["neg"]))
    out["num-examples"] = int(round(max(0.0, total)))
    return out
