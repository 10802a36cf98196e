"""Flower strategies with fedxray's checks, round offset and pooled evaluation.

A thin layer over Flower's own strategies (FedAvg, FedProx, FedAdam, FedTrimmedAvg, FedMedian):
it does not copy their loop. It adds

* a round offset, so a resumed run continues at round k+1 (the sites' ledgers and reply caches
  key on the round number);
* update validation before aggregation: keys and shapes, NaN/Inf, and an update norm far beyond
  what the local optimiser could produce from clipped gradients. A bad update is rejected for that
  round and logged; the round goes on with the others;
* per-site bookkeeping (epsilon, loss, validation metrics) and the pooled validation AUC from the
  sites' score histograms, for the round record.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedMedian, FedProx, FedTrimmedAvg

from common import metrics
from common.config import RunConfig

log = logging.getLogger(__name__)

# An update is rejected when its L2 norm exceeds this multiple of what the optimiser can move
# the weights in the round's steps (Adam: about lr per weight per step; SGD: lr x clipped+noised
# gradient, amplified by momentum). Generous on purpose: it catches broken or hostile updates,
# not unlucky ones.
NORM_SAFETY = 4.0


@dataclass
class RoundLog:
    """What the strategy learnt in one round (train + evaluate), for the round record."""

    train: dict[str, dict[str, float]] = field(default_factory=dict)  # site -> train metrics
    evaluate: dict[str, dict[str, Any]] = field(default_factory=dict)  # site -> eval metrics (+ hist)
    rejected: dict[str, str] = field(default_factory=dict)  # site/node -> reason
    failures: list[str] = field(default_factory=list)  # error replies (e.g. budget refused)


def _site_name(msg: Message) -> str:
    rec = msg.content.get("site") if msg.has_content() else None
    if isinstance(rec, ConfigRecord) and "site-name" in rec:
        return str(rec["site-name"])
    return f"node-{msg.metadata.src_node_id}"


def update_norm_bound(run: RunConfig, steps: int, n_params: int, noise_multiplier: float) -> float:
    """Largest plausible L2 norm of one round's weight change at a site (see NORM_SAFETY)."""
    steps = max(1, steps)
    if run.optimizer == "adam":
        per_step = run.learning_rate * math.sqrt(n_params)
    else:
        # With sample-rate batches the server does not know a site's batch: assume the smallest.
        batch = run.batch_size if run.sample_rate == 0 else 1
        grad = run.max_grad_norm * (1.0 + noise_multiplier * math.sqrt(n_params) / max(1, batch))
        per_step = run.learning_rate * grad / (1.0 - run.momentum)
    return NORM_SAFETY * per_step * steps


def check_update(
    update: dict[str, np.ndarray], reference: dict[str, np.ndarray], *, bound: float | None
) -> str | None:
    """Why an update must be rejected, or None when it is acceptable."""
    if set(update) != set(reference):
        missing = sorted(set(reference) - set(update))[:3]
        extra = sorted(set(update) - set(reference))[:3]
        return f"keys differ from the global model (missing {missing}, unexpected {extra})"
    sq = 0.0
    for key, ref in reference.items():
        arr = update[key]
        if arr.shape != ref.shape:
            return f"shape of {key} is {tuple(arr.shape)}, expected {tuple(ref.shape)}"
        if arr.dtype.kind == "f":
            if not np.all(np.isfinite(arr)):
                return f"{key} contains NaN or Inf"
            sq += float(np.sum((arr.astype(np.float64) - ref.astype(np.float64)) ** 2))
    norm = math.sqrt(sq)
    if bound is not None and norm > bound:
        return f"update norm {norm:.3g} is far beyond the clipping/optimiser bound {bound:.3g}"
    return None


class FedxrayMixin:
    """Mixed in front of a Flower strategy class (see ``make_strategy``)."""

    def _fx_init(self, run: RunConfig, round_offset: int) -> None:
        self.run = run
        self.round_offset = round_offset
        self.logs: dict[int, RoundLog] = {}
        self._global: dict[str, np.ndarray] = {}
        self.threshold = 0.5

    # -- round offset -----------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        r = server_round + self.round_offset
        self._global = {k: v.numpy() for k, v in arrays.items()}
        return super().configure_train(r, arrays, config, grid)  # type: ignore[misc]

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        config["threshold"] = float(self.threshold)
        return super().configure_evaluate(server_round + self.round_offset, arrays, config, grid)  # type: ignore[misc]

    # -- validation before aggregation ------------------------------------------------
    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        r = server_round + self.round_offset
        entry = self.logs.setdefault(r, RoundLog())
        good: list[Message] = []
        n_params = sum(int(v.size) for v in self._global.values() if v.dtype.kind == "f")
        for msg in replies:
            site = _site_name(msg)
            if msg.has_error():
                reason = msg.error.reason or f"error code {msg.error.code}"
                entry.failures.append(f"{site}: {reason}")
                log.warning("round %d: %s sent no update: %s", r, site, reason)
                continue
            try:
                arrays = next(iter(msg.content.array_records.values()))
                update = {k: v.numpy() for k, v in arrays.items()}
                m = dict(next(iter(msg.content.metric_records.values())))
            except (StopIteration, KeyError, ValueError, TypeError) as err:
                entry.rejected[site] = f"malformed reply ({err})"
                log.warning("round %d: rejected the update of %s: malformed reply", r, site)
                continue
            bound = update_norm_bound(self.run, int(m.get("steps", 1)), n_params, float(m.get("noise-multiplier", 0)))
            reason = check_update(update, self._global, bound=bound) if self._global else None
            if reason is None and "num-examples" not in m:
                reason = "missing required key `num-examples` in the metrics"
            if reason is not None:
                entry.rejected[site] = reason
                log.warning("round %d: rejected the update of %s: %s", r, site, reason)
                continue
            entry.train[site] = {k: float(v) for k, v in m.items() if isinstance(v, (int, float))}
            good.append(msg)
        if not good:
            log.warning("round %d: no valid update; the global model stays as it was", r)
            return None, None
        return super().aggregate_train(r, good)  # type: ignore[misc]

    # -- pooled evaluation ------------------------------------------------------------
    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        r = server_round + self.round_offset
        entry = self.logs.setdefault(r, RoundLog())
        for msg in replies:
            site = _site_name(msg)
            if msg.has_error():
                entry.failures.append(f"{site} (evaluate): {msg.error.reason}")
                continue
            m = dict(next(iter(msg.content.metric_records.values())))
            entry.evaluate[site] = {k: (list(v) if isinstance(v, list) else float(v)) for k, v in m.items()}
        return self.pooled(r)

    def pooled(self, r: int) -> MetricRecord | None:
        entry = self.logs.get(r)
        if entry is None or not entry.evaluate:
            return None
        sites = list(entry.evaluate.values())
        weights = [int(s.get("num-examples", 0)) for s in sites]
        hists = [{"pos": s.get("hist-pos", []), "neg": s.get("hist-neg", [])} for s in sites if s.get("hist-pos")]
        out: dict[str, float] = {
            "eval-loss": metrics.weighted_mean([s.get("eval-loss", math.nan) for s in sites], weights),
            "site-auc-mean": metrics.weighted_mean([s.get("auc", math.nan) for s in sites], weights),
            "sensitivity": metrics.weighted_mean([s.get("sensitivity", math.nan) for s in sites], weights),
            "specificity": metrics.weighted_mean([s.get("specificity", math.nan) for s in sites], weights),
            "num-examples": float(sum(weights)),
        }
        if hists:
            out["pooled-auc"] = metrics.pooled_auc_from_histograms(hists)
            fpr, tpr = metrics.pooled_roc_from_histograms(hists)
            self.threshold = _youden_threshold(hists, fpr, tpr)
        else:
            out["pooled-auc"] = out["site-auc-mean"]
        out["threshold"] = float(self.threshold)
        return MetricRecord(out)


def _youden_threshold(hists: list[dict[str, list[int]]], fpr: np.ndarray, tpr: np.ndarray) -> float:
    """The bin edge maximising sensitivity + specificity - 1 on the pooled validation histograms."""
    pos = np.sum([np.asarray(h["pos"], float) for h in hists], axis=0)
    neg = np.sum([np.asarray(h["neg"], float) for h in hists], axis=0)
    bins = len(pos)
    if pos.sum() == 0 or neg.sum() == 0:
        return 0.5
    # predicting positive for bins >= k: sensitivity = pos[k:].sum()/P, specificity = neg[:k].sum()/N
    sens = np.cumsum(pos[::-1])[::-1] / pos.sum()
    spec = np.concatenate([[0.0], np.cumsum(neg)[:-1]]) / neg.sum()
    k = int(np.argmax(sens + spec - 1.0))
    return float(k / bins)


_BASES = {
    "fedavg": FedAvg,
    "fedprox": FedProx,
    "fedadam": FedAdam,
    "trimmed-mean": FedTrimmedAvg,
    "median": FedMedian,
}


def make_strategy(run: RunConfig, *, round_offset: int = 0, min_sites: int | None = None) -> FedAvg:
    """The run's strategy class with fedxray's checks mixed in, configured from the run config."""
    base = _BASES[run.strategy]
    cls = type(f"Fedxray{base.__name__}", (FedxrayMixin, base), {})
    n = min_sites or run.min_sites
    kwargs: dict[str, Any] = dict(
        fraction_train=run.fraction_train, fraction_evaluate=1.0, min_train_nodes=n,
        min_evaluate_nodes=n, min_available_nodes=n,
    )
    if run.strategy == "fedprox":
        kwargs["proximal_mu"] = run.proximal_mu
    elif run.strategy == "fedadam":
        kwargs.update(eta=run.server_learning_rate, eta_l=run.learning_rate)
    elif run.strategy == "trimmed-mean":
        kwargs["beta"] = run.trim_beta
    strategy = cls(**kwargs)
    strategy._fx_init(run, round_offset)
    return strategy


def strategy_state(strategy: Any) -> dict[str, Any]:
    """Server-optimiser state to checkpoint (FedAdam moments), as plain numpy dicts."""
    state: dict[str, Any] = {"threshold": float(getattr(strategy, "threshold", 0.5))}
    for name in ("m_t", "v_t"):
        value = getattr(strategy, name, None)
        if value is not None:
            state[name] = {k: np.asarray(v) for k, v in value.items()}
    return state


def load_strategy_state(strategy: Any, state: dict[str, Any]) -> None:
    strategy.threshold = float(state.get("threshold", 0.5))
    for name in ("m_t", "v_t"):
        if name in state and hasattr(strategy, name):
            setattr(strategy, name, {k: np.asarray(v) for k, v in state[name].items()})
