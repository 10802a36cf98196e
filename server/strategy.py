"""Flower strategies with fedxray's checks, round offset and pooled evaluation.

A thin layer over Flower's own strategies (FedAvg, FedProx, FedAdam, FedTrimmedAvg, FedMedian):
it does not copy their loop. It adds

* a round offset, so a resumed run continues at round k+1 (the sites' ledgers and reply caches
  key on the round number);
* update validation before aggregation: keys and shapes, NaN/Inf, and an update norm far beyond
  what the local optimiser could produce from clipped gradients. A bad update is rejected for that
  round and logged; the round goes on with the others;
* per-site bookkeeping (epsilon, loss, validation metrics) and the pooled validation AUC from the
  sites' noised score histograms, for the round record;
* the coordinator's own checks: a site is its node id (the name it reports is a label bound on
  first sight), the update-norm bound uses the coordinator's own DP plan (steps and noise from the
  run config), a site's weight in the average is the size it declares capped by the count it first
  reported and by the run's ``max-site-examples`` (every site weighs the same without that cap), and
  optional server-side clipping of each update (run config ``server-clip``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedMedian, FedProx, FedTrimmedAvg

from common import metrics
from common.config import RunConfig
from common.pooled_metrics import THRESHOLD_RULES
from server import gate
from server.ema import WeightAverage
from server.pooled_evaluation import DEFAULT_EVAL_NOISE, binary_pooled, class_auc_interval, site_estimates
from server.update_checks import check_update, clip_update, server_plan, site_weight, update_norm_bound

log = logging.getLogger("flwr.fedxray.strategy")  # reaches the run log through Flower's handler


@dataclass
class RoundLog:
    """What the strategy learnt in one round (train + evaluate), for the round record."""

    train: dict[str, dict[str, float]] = field(default_factory=dict)  # site -> train metrics
    evaluate: dict[str, dict[str, Any]] = field(default_factory=dict)  # site -> eval metrics (+ hist)
    rejected: dict[str, str] = field(default_factory=dict)  # site/node -> reason
    failures: list[str] = field(default_factory=list)  # error replies (e.g. budget refused)


def _claimed_name(msg: Message) -> str | None:
    rec = msg.content.get("site") if msg.has_content() else None
    if isinstance(rec, ConfigRecord) and "site-name" in rec:
        return str(rec["site-name"])
    return None


class FedxrayMixin:
    """Mixed in front of a Flower strategy class (see ``make_strategy``)."""

    def _fx_init(self, run: RunConfig, round_offset: int) -> None:
        self.run = run
        self.round_offset = round_offset
        self.logs: dict[int, RoundLog] = {}
        self._global: dict[str, np.ndarray] = {}
        self.threshold = 0.5
        self.plan = server_plan(run)
        self.names: dict[int, str] = {}  # node id -> the site name it first reported (one name per node)
        self.registered_examples: dict[int, int] = {}  # node id -> training images first reported this run
        self.gate_reference = ""  # the intended-use gate's pooled reference (JSON), once the sites sent their sums
        self.average = WeightAverage(run.weight_average)  # what is evaluated and exported (server/ema.py)

    # -- who is who ---------------------------------------------------------------------
    def site_of(self, msg: Message) -> tuple[str, str | None]:
        """(label, problem): a site is its node id (bound to its certificate and key at admission); the
        name it reports is a label, kept from the first reply. A reply claiming a name that another node
        uses is a problem (it would overwrite that site's figures)."""
        node = int(msg.metadata.src_node_id)
        claimed = _claimed_name(msg)
        if node in self.names:
            label = self.names[node]
            if claimed is not None and claimed != label:
                return label, f"reported site name {claimed!r}, but node {node} joined as {label!r}"
            return label, None
        label = claimed or f"node-{node}"
        if label in self.names.values():
            return f"node-{node}", f"reported site name {label!r}, which another node already uses"
        self.names[node] = label
        return label, None

    # -- round offset -----------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        r = server_round + self.round_offset
        self._global = {k: v.numpy() for k, v in arrays.items()}
        return super().configure_train(r, arrays, config, grid)  # type: ignore[misc]

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        config["threshold"] = float(self.threshold)
        # The last round also asks for the (noised) image statistics of the drift reference, and tells the
        # sites this is the evaluation of the model to export (they choose how precisely to answer it).
        config["reference-stats"] = server_round + self.round_offset >= self.run.num_server_rounds
        config.update(gate.evaluate_config(self.gate_reference))  # server/gate.py
        config["final-evaluation"] = config["reference-stats"]
        if self.average.active and self.average.weights:  # the sites evaluate the model that will be exported
            arrays = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in self.average.weights.items()})
        return super().configure_evaluate(server_round + self.round_offset, arrays, config, grid)  # type: ignore[misc]

    # -- validation before aggregation ------------------------------------------------
    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        r = server_round + self.round_offset
        entry = self.logs.setdefault(r, RoundLog())
        good: list[Message] = []
        n_params = sum(int(v.size) for v in self._global.values() if v.dtype.kind == "f")
        for msg in replies:
            site, identity_problem = self.site_of(msg)
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
            reason = identity_problem
            if reason is None and "num-examples" not in m:
                reason = "missing required key `num-examples` in the metrics"
            if reason is None:
                node = int(msg.metadata.src_node_id)
                # A site's weight in the average is capped by what it first reported this run.
                first = self.registered_examples.setdefault(node, max(1, int(m["num-examples"])))
                if int(m["num-examples"]) > first:
                    log.warning("round %d: %s now reports %d training images, %d before; weighting it by %d",
                                r, site, int(m["num-examples"]), first, first)
                # ... and by the run's cap, which the coordinator sets (equal weights without one).
                weight = site_weight(min(int(m["num-examples"]), first), self.run)
                if weight != int(m["num-examples"]):
                    m["num-examples"] = weight
                    msg.content.metric_records[next(iter(msg.content.metric_records))]["num-examples"] = weight
                steps = self.plan.steps or int(m.get("steps", 1))
                sigma = self.plan.noise_multiplier if self.plan.noise_multiplier is not None else float(m.get("noise-multiplier", 0))
                batch = self.run.sample_rate * first if self.run.sample_rate > 0 else float(self.run.batch_size)
                # Without DP nothing clips a site's gradients, so no step bound holds: only shapes and
                # finite values are checked (and server-clip, when set, bounds every update).
                bound = update_norm_bound(self.run, steps, n_params, sigma, batch) if self.run.dp else None
                reason = check_update(update, self._global, bound=bound) if self._global else None
            if reason is None and self.run.server_clip > 0 and self._global:
                clipped, norm = clip_update(update, self._global, self.run.server_clip)
                if clipped is not update:
                    log.info("round %d: clipped the update of %s from norm %.3g to %.3g", r, site, norm, self.run.server_clip)
                    key = next(iter(msg.content.array_records))
                    msg.content.array_records[key] = ArrayRecord({k: np.ascontiguousarray(v) for k, v in clipped.items()})
            if reason is not None:
                entry.rejected[site] = reason
                log.warning("round %d: rejected the update of %s: %s", r, site, reason)
                continue
            entry.train[site] = {k: float(v) for k, v in m.items() if isinstance(v, (int, float))}
            good.append(msg)
        if not good:
            log.warning("round %d: no valid update; the global model stays as it was", r)
            return None, None
        arrays, train_metrics = super().aggregate_train(r, good)  # type: ignore[misc]
        if arrays is not None and self.average.active:
            self.average.update({k: v.numpy() for k, v in arrays.items()})
        return arrays, train_metrics

    # -- pooled evaluation ------------------------------------------------------------
    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        r = server_round + self.round_offset
        entry = self.logs.setdefault(r, RoundLog())
        for msg in replies:
            site, problem = self.site_of(msg)
            if msg.has_error():
                entry.failures.append(f"{site} (evaluate): {msg.error.reason}")
                continue
            if problem is not None:
                entry.rejected[site] = problem
                continue
            m = dict(next(iter(msg.content.metric_records.values())))
            values = {k: (list(v) if isinstance(v, list) else float(v)) for k, v in m.items()}
            try:
                if values.get("hist-pos") and values.get("hist-neg"):
                    values.update(site_estimates(values))
                elif per_class := _class_histograms(values):
                    aucs = [metrics.pooled_auc_from_histograms([h]) for h in per_class.values()]
                    values["auc"] = float(np.nanmean(aucs)) if not all(a != a for a in aucs) else math.nan
            except metrics.MetricsError as err:
                entry.rejected[site] = f"malformed evaluation histograms ({err})"
                continue
            entry.evaluate[site] = values
        self.gate_reference = self.gate_reference or gate.pooled_reference(entry.evaluate.values())
        return self.pooled(r)

    def pooled(self, r: int) -> MetricRecord | None:
        """Pooled validation metrics of round ``r``, all from the sites' noised score histograms."""
        entry = self.logs.get(r)
        if entry is None or not entry.evaluate:
            return None
        sites = list(entry.evaluate.values())
        weights = [max(0, int(s.get("num-examples", 0))) for s in sites]
        hists = [{"pos": s["hist-pos"], "neg": s["hist-neg"]} for s in sites if s.get("hist-pos")]
        out: dict[str, float] = {
            "site-auc-mean": metrics.weighted_mean([s.get("auc", math.nan) for s in sites], weights),
            "num-examples": float(sum(weights)),
        }
        per_class = [_class_histograms(s) for s in sites]
        if hists:
            noise = [float(s.get("eval-noise", DEFAULT_EVAL_NOISE)) for s in sites if s.get("hist-pos")]
            final = all(bool(s.get("eval-final")) for s in sites if s.get("hist-pos"))
            out.update(binary_pooled(hists, noise, self.run.operating, final=final))
            self.threshold = out["threshold"]
        elif any(per_class):
            # Multiclass / multilabel: each class pooled over the sites (one-vs-rest), then the macro AUC.
            classes = sorted({c for p in per_class for c in p}, key=lambda c: (len(c), c))
            for c in classes:
                out.update(class_metrics(c, [p[c] for p in per_class if c in p], multilabel=self.run.task == "multilabel"))
                out.update(class_auc_interval(c, [(p[c], float(s.get("eval-noise", DEFAULT_EVAL_NOISE)))
                                                  for p, s in zip(per_class, sites, strict=True) if c in p]))
            aucs = [out[f"pooled-auc-{c}"] for c in classes]
            out["pooled-auc"] = float(np.nanmean(aucs)) if any(a == a for a in aucs) else math.nan
            if self.run.task == "multilabel":
                out["eval-loss"] = float(np.nanmean([out[f"eval-loss-{c}"] for c in classes]))
        else:
            out["pooled-auc"] = out["site-auc-mean"]
        out["threshold"] = float(self.threshold)
        return MetricRecord(out)


def class_metrics(c: str, hists: list[dict[str, list[float]]], *, multilabel: bool) -> dict[str, float]:
    """Pooled one-vs-rest figures of class / finding ``c`` (its output index) from the sites' noised histograms.

    Multilabel: the finding's own threshold (Youden's J on the pooled histograms, or the prevalence-matched
    one where Youden's is unreliable: common.pooled_metrics.robust_histogram_threshold) with its sensitivity,
    specificity and ``threshold-rule-<c>`` (the rule's index in THRESHOLD_RULES; a MetricRecord holds numbers).
    Multiclass decides by the most likely class, so no threshold is chosen.
    """
    pos = np.clip(np.sum([np.asarray(h["pos"], float) for h in hists], axis=0), 0.0, None)
    neg = np.clip(np.sum([np.asarray(h["neg"], float) for h in hists], axis=0), 0.0, None)
    out = {f"pooled-auc-{c}": metrics.pooled_auc_from_histograms(hists),
           f"positives-{c}": float(pos.sum()), f"negatives-{c}": float(neg.sum())}
    if multilabel:
        threshold, rule = metrics.robust_histogram_threshold(hists, metrics.EVAL_EDGES)
        out[f"threshold-{c}"] = threshold
        out[f"threshold-rule-{c}"] = float(THRESHOLD_RULES.index(rule))
        out[f"sensitivity-{c}"], out[f"specificity-{c}"] = metrics.histogram_rates(hists, threshold, metrics.EVAL_EDGES)
        out[f"eval-loss-{c}"] = metrics.histogram_loss(hists, metrics.EVAL_EDGES)
    return out


def _class_histograms(values: dict[str, Any]) -> dict[str, dict[str, list[float]]]:
    """{class index: {"pos", "neg"}} from a multiclass / multilabel evaluate reply (hist-pos-<c>, hist-neg-<c>)."""
    out: dict[str, dict[str, list[float]]] = {}
    for key, value in values.items():
        if key.startswith("hist-pos-") and f"hist-neg-{key[9:]}" in values:
            out[key[9:]] = {"pos": value, "neg": values[f"hist-neg-{key[9:]}"]}
    return out


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
    state: dict[str, Any] = {"threshold": float(getattr(strategy, "threshold", 0.5)),
                             "gate_reference": str(getattr(strategy, "gate_reference", ""))}
    average = getattr(strategy, "average", None)
    if average is not None and average.active:
        state["weight_average"] = average.state()
    for name in ("m_t", "v_t"):
        value = getattr(strategy, name, None)
        if value is not None:
            state[name] = {k: np.asarray(v) for k, v in value.items()}
    return state


def load_strategy_state(strategy: Any, state: dict[str, Any]) -> None:
    strategy.threshold = float(state.get("threshold", 0.5))
    strategy.gate_reference = str(state.get("gate_reference", ""))
    if "weight_average" in state and hasattr(strategy, "average"):
        strategy.average = WeightAverage(strategy.average.decay, state["weight_average"])
    for name in ("m_t", "v_t"):
        if name in state and hasattr(strategy, name):
            setattr(strategy, name, {k: np.asarray(v) for k, v in state[name].items()})
