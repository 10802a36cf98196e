"""The hospital's Flower ClientApp: records in, plain training/evaluation calls, records out.

Deployment starts a new process for every message, so nothing is kept in module globals:
the site's cache, salt, privacy ledger and reply cache live under its state dir.

Train reply: the unwrapped weights (model keys, no Opacus prefix), ``num-examples`` (training
images), ``train-loss``, ``epsilon-round`` / ``epsilon-total`` (this run's round and the dataset's
cumulative spend over all runs), and a ConfigRecord naming the site. Evaluate reply: loss, AUC,
sensitivity/specificity at the model threshold and per-class score histograms, from which the
coordinator pools the AUC without seeing any single score. Nothing identifies a patient or file.
"""

from __future__ import annotations

import logging
import os

from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.ledger import (
    BudgetExceeded,
    DeltaTooLargeError,
    LedgerConflictError,
    LedgerCorruptError,
    PrivacyLedger,
    dataset_fingerprint,
)
from client.privacy import plan_dp
from client.site import ReplyCache, resolve_device, site_config, weights_digest
from client.train import TrainSettings, evaluate, train_one_round
from common.config import ConfigError, RunConfig
from common.dataset import DatasetError
from common.loaders import load_site
from common.models import build_model, grad_sample_mode

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
log = logging.getLogger(__name__)
app = ClientApp()

# Error codes in replies (the coordinator logs them and goes on with the other sites).
ERR_CONFIG, ERR_DATA, ERR_BUDGET, ERR_DP_REQUIRED, ERR_LEDGER = 4001, 4002, 4003, 4004, 4005


def _error(msg: Message, code: int, reason: str) -> Message:
    log.error("%s", reason)
    return Message(Error(code=code, reason=reason), reply_to=msg)


def _setup(msg: Message, context: Context):
    run = RunConfig.from_mapping(context.run_config)
    site = site_config(context.node_config, context.run_config)
    config = msg.content.get("config", ConfigRecord())
    data = load_site(site.data_dir, site.state_dir, image_size=run.image_size, task=run.task, labels=run.labels,
                     val_fraction=run.val_fraction, seed=run.seed)
    return run, site, config, data


@app.train()
def train(msg: Message, context: Context) -> Message:
    try:
        run, site, config, data = _setup(msg, context)
    except (ConfigError, DatasetError) as err:
        return _error(msg, ERR_CONFIG if isinstance(err, ConfigError) else ERR_DATA, str(err))
    server_round = int(config.get("server-round", 0))
    # Name plus the coordinator's random run id: a new run with the same name and seed is not a retry.
    run_name = "-".join(str(config[k]) for k in ("run-name", "run-id") if k in config) or "run"
    state = msg.content["arrays"].to_torch_state_dict()
    digest = weights_digest(state)
    replies = ReplyCache(site.state_dir, run_name)
    cached = replies.get(server_round, digest)
    if cached is not None:
        log.info("round %d: same global model as an earlier attempt; re-sending that reply (no new privacy spent)",
                 server_round)
        return _train_reply(msg, site.site_name, cached)

    settings = TrainSettings(
        task=run.task, local_epochs=run.local_epochs, batch_size=run.batch_size, learning_rate=run.learning_rate,
        optimizer=run.optimizer, proximal_mu=float(config.get("proximal-mu", 0.0)), dp=run.dp,
        max_grad_norm=run.max_grad_norm, grad_sample_mode=grad_sample_mode(run.model),
        seed=run.seed * 1000 + server_round,
    )
    eps_round = eps_total = 0.0
    if run.dp:
        delta = min(run.delta, site.delta)
        plan = plan_dp(n_train=data.n_train, batch_size=min(run.batch_size, data.n_train),
                       local_epochs=run.local_epochs, rounds=run.num_server_rounds, delta=delta,
                       max_grad_norm=run.max_grad_norm,
                       noise_multiplier=run.noise_multiplier or None,
                       target_epsilon=None if run.noise_multiplier else run.target_epsilon)
        ledger = PrivacyLedger(site.state_dir, site=site.site_name, max_epsilon=site.max_epsilon, delta=site.delta)
        fingerprint = dataset_fingerprint(data.train_hashes())
        before = ledger.spent(fingerprint)
        try:
            entry = ledger.reserve(run_id=f"{run_name}@{digest[:12]}", round=server_round, fingerprint=fingerprint,
                                   noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate,
                                   steps=plan.steps_per_round, max_grad_norm=plan.max_grad_norm,
                                   n_train=data.n_train, delta=delta)
        except BudgetExceeded as err:
            return _error(msg, ERR_BUDGET, f"site {site.site_name}: {err}")
        except (LedgerCorruptError, LedgerConflictError, DeltaTooLargeError) as err:
            return _error(msg, ERR_LEDGER, f"site {site.site_name}: privacy ledger: {err}")
        eps_total = entry.epsilon_after
        eps_round = max(0.0, eps_total - before)
        settings = TrainSettings(**{**settings.__dict__, "noise_multiplier": plan.noise_multiplier,
                                    "steps": plan.steps_per_round,
                                    "batch_size": min(run.batch_size, data.n_train)})
    elif not site.allow_no_dp:
        return _error(msg, ERR_DP_REQUIRED, f"site {site.site_name} trains only with DP (allow-no-dp is false); "
                      "the run asked for dp=false")

    model = build_model(run.model, num_outputs=run.num_outputs, dp=True)
    model.load_state_dict(state)
    weights, stats = train_one_round(model, data.train_dataset(augment=run.augment), settings,
                                     device=resolve_device(site.device))
    reply = {
        "weights": weights,
        "metrics": {"num-examples": stats.num_examples, "train-loss": stats.loss, "steps": stats.steps,
                    "epsilon-round": eps_round, "epsilon-total": eps_total,
                    "noise-multiplier": settings.noise_multiplier, "train-seconds": stats.seconds},
    }
    replies.put(server_round, digest, reply)
    log.info("round %d: trained on %d images, loss %.4f, epsilon %.3f (total %.3f)", server_round,
             stats.num_examples, stats.loss, eps_round, eps_total)
    return _train_reply(msg, site.site_name, reply)


def _train_reply(msg: Message, site_name: str, reply: dict) -> Message:
    content = RecordDict({
        "arrays": ArrayRecord(reply["weights"]),
        "metrics": MetricRecord({k: float(v) if k != "num-examples" else int(v) for k, v in reply["metrics"].items()}),
        "site": ConfigRecord({"site-name": site_name}),
    })
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate_handler(msg: Message, context: Context) -> Message:
    try:
        run, site, config, data = _setup(msg, context)
    except (ConfigError, DatasetError) as err:
        return _error(msg, ERR_CONFIG if isinstance(err, ConfigError) else ERR_DATA, str(err))
    model = build_model(run.model, num_outputs=run.num_outputs, dp=True)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    threshold = float(config.get("threshold", 0.5))
    stats = evaluate(model, data.val_dataset(), task=run.task, threshold=threshold,
                     device=resolve_device(site.device))
    hist = stats.histograms or {"pos": [], "neg": []}
    metrics = MetricRecord({
        "num-examples": stats.num_examples, "eval-loss": stats.loss, "auc": stats.auc,
        "sensitivity": stats.sensitivity, "specificity": stats.specificity, "num-positive": stats.num_positive,
        "hist-pos": [int(v) for v in hist["pos"]], "hist-neg": [int(v) for v in hist["neg"]],
        "n-train": data.n_train,
    })
    content = RecordDict({"metrics": metrics, "site": ConfigRecord({"site-name": site.site_name})})
    return Message(content=content, reply_to=msg)
