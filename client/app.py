"""The hospital's Flower ClientApp: records in, client/round.py's plain calls, records out.

Deployment starts a new process for every message, so nothing is kept in module globals:
the site's cache, salt, privacy ledger and reply cache live under its state dir. What the site
decides (DP plan, ledger, reply cache, training) is in client/round.py, testable without Flower.

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

from client.round import ERR_CONFIG, RoundRefused, RoundRequest, evaluate_round, train_round
from client.site import site_config
from common.config import RunConfig
from common.config_fields import ConfigError

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
log = logging.getLogger(__name__)
app = ClientApp()


def _error(msg: Message, code: int, reason: str) -> Message:
    log.error("%s", reason)
    return Message(Error(code=code, reason=reason), reply_to=msg)


def _request(msg: Message, context: Context):
    """(run config, site config, round request) from a message; ConfigError when either config is bad."""
    run = RunConfig.from_mapping(context.run_config)
    site = site_config(context.node_config, context.run_config)
    config = msg.content.get("config", ConfigRecord())
    # Name plus the coordinator's random run id: a new run with the same name and seed is not a retry.
    run_name = "-".join(str(config[k]) for k in ("run-name", "run-id") if k in config) or "run"
    request = RoundRequest(
        server_round=int(config.get("server-round", 0)), weights=msg.content["arrays"].to_torch_state_dict(),
        run_name=run_name, proximal_mu=float(config.get("proximal-mu", 0.0)),
        threshold=float(config.get("threshold", 0.5)), reference=bool(config.get("reference-stats", False)),
        flower_run_id=int(context.run_id),  # the SuperLink's id of the launched run: fixed for all its messages
        gate_stats=bool(config.get("gate-stats", False)), gate_reference=str(config.get("gate-reference", "")),
        final=bool(config.get("final-evaluation", False)),
    )
    return run, site, request


def _site_record(site_name: str) -> ConfigRecord:
    return ConfigRecord({"site-name": site_name})


@app.train()
def train(msg: Message, context: Context) -> Message:
    try:
        run, site, request = _request(msg, context)
        reply = train_round(run, site, request)
    except ConfigError as err:
        return _error(msg, ERR_CONFIG, str(err))
    except RoundRefused as err:
        return _error(msg, err.code, err.reason)
    content = RecordDict({
        "arrays": ArrayRecord(reply.weights),
        "metrics": MetricRecord({k: int(v) if k == "num-examples" else float(v) for k, v in reply.metrics.items()}),
        "site": _site_record(site.site_name),
    })
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate_handler(msg: Message, context: Context) -> Message:
    try:
        run, site, request = _request(msg, context)
        metrics = evaluate_round(run, site, request)
    except ConfigError as err:
        return _error(msg, ERR_CONFIG, str(err))
    except RoundRefused as err:
        return _error(msg, err.code, err.reason)
    content = RecordDict({"metrics": MetricRecord(metrics), "site": _site_record(site.site_name)})
    return Message(content=content, reply_to=msg)
