"""The coordinator's part of the intended-use gate's image check (common/ood.py; the sites' side: client/gate_stats.py).

* :func:`evaluate_config`: what an evaluate message asks: ``gate-stats`` while the coordinator holds
  no reference, then ``gate-reference`` (the pooled reference, JSON) in every later message; the
  sites answer it with their score histogram in the last round.
* :func:`pooled_reference`: the reference from one round's replies (the first round whose replies
  carry ``gate-sum``; later rounds never change it, so the export can rebuild it from the history).
* :func:`export_gate`: at export, the score module (reference baked in) and the ``fedxray.ood``
  metadata (the cut-off and how it was set), or None with the reason in the log.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from torch import nn

from common.ood import (
    CutOff,
    GateReference,
    OodError,
    OodScore,
    cutoff_from_histograms,
    descriptor_for,
    pool_reference,
)

log = logging.getLogger("flwr.fedxray")


def evaluate_config(reference: str) -> dict[str, Any]:
    """The gate's keys of an evaluate message's config."""
    return {"gate-reference": reference} if reference else {"gate-stats": True}


def pooled_reference(replies: Iterable[Mapping[str, Any]]) -> str:
    """The pooled reference (JSON) from the sites' ``gate-sum`` / ``gate-n``, "" when none sent them."""
    try:
        ref = pool_reference(replies)
    except OodError as err:
        log.warning("intended-use gate: %s", err)
        return ""
    if ref is None:
        return ""
    log.info("intended-use gate: reference pooled from about %.0f validation images", ref.n_images)
    return ref.to_json()


def reference_from_history(history: list[dict[str, Any]]) -> GateReference | None:
    """The reference the coordinator sent: pooled from the first round whose site records carry ``gate-sum``."""
    for record in history:
        sites = [s for s in record.get("sites", {}).values() if s.get("gate-sum")]
        if sites:
            text = pooled_reference(sites)
            return GateReference.from_json(text) if text else None
    return None


def export_gate(history: list[dict[str, Any]], model: nn.Module, *, exported_last: bool) -> tuple[OodScore, CutOff, str] | None:
    """(score module, cut-off, ``fedxray.ood`` JSON) for the exported model, or None (logged) when it cannot have one.

    The cut-off comes from the last round's score histograms. A model whose penultimate layer trains
    (a CNN) has them only for the last round's weights: exporting another round gets no image check.
    """
    last = history[-1] if history else {}
    hists = [s["gate-hist"] for s in last.get("sites", {}).values() if s.get("gate-hist")]
    noise = [float(s.get("gate-noise", 0.0)) for s in last.get("sites", {}).values() if s.get("gate-hist")]
    reference = reference_from_history(history)
    if reference is None or not hists:
        log.warning("exported model has no intended-use image check: %s", "the sites sent no gate reference"
                    if reference is None else "the sites sent no score histograms in the last round (a run of one round?)")
        return None
    try:
        descriptor = descriptor_for(model)
        if descriptor.order1 is None and not exported_last:
            raise OodError("the exported round is not the last one, and this model's penultimate layer changed since")
        cut = cutoff_from_histograms(hists, max(noise))
        score = OodScore(descriptor, reference)
    except OodError as err:
        log.warning("exported model has no intended-use image check: %s", err)
        return None
    kind = ("scattering order-1 profile + 4x4 energy, 4x4 order-0 layout (turned/inverted odds)" if descriptor.order1 is not None
            else "penultimate layer, 32 groups")
    log.info("intended-use image check: cut-off %.3g (%.1f x the estimated 98th percentile %.3g; about %.1f%% +- %.1f%% "
             "of %.0f validation images above it)", cut.cutoff, cut.margin, cut.q98, 100 * cut.refused_estimate,
             100 * cut.refused_sd, cut.validation_images)
    return score, cut, cut.to_json(reference, kind)
