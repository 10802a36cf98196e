"""The model as the clinic sees it: an ONNX file, its identity, and one image scored with a heatmap.

:class:`Scorer` is the only place that runs the model in ``fl-predict`` and ``serve``. It keeps
the exported file's own description (``fedxray.*`` metadata, interface 3, docs/interfaces.md) and adds what a
report needs to name the model unambiguously: the SHA-256 of the file (a model's version is
its bytes; the export time alone does not tell two exports of one run apart).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset

from clinic.heatmap import Explainer
from clinic.torchscript import TorchScriptExplainer, open_model
from common.devices import describe_providers, onnx_providers
from common.intended_use import ASSESSED, Verdict, check_header, check_matrix, check_score, facts_from_dataset
from common.onnx_export import OnnxClassifier
from common.preprocess import to_model_input
from common.torchscript_export import TorchScriptClassifier

logger = logging.getLogger(__name__)

_UID_NAMESPACE = uuid.UUID("3c5c2a8e-1f4d-5b9a-8c0e-fedc11a1c000")


#: heatmaps per image at most (multilabel: the top finding, then the other findings called positive)
MAX_HEATMAPS = 3


@dataclass(frozen=True)
class ModelIdentity:
    """What a report says about the model (all from the ONNX file; nothing about patients)."""

    name: str  # architecture, e.g. "scatternet"
    task: str
    labels: list[str]
    threshold: float
    rounds: int
    sites: Any  # JSON value from fedxray.sites (a list of site names, or a count)
    epsilon: dict[str, float | None]  # site -> epsilon spent (None: that site trained without DP)
    created: str  # export time, ISO-8601
    sha256: str  # of the ONNX file
    export_round: str = ""  # the round whose weights were exported, when the server recorded it
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def version(self) -> str:
        """Human-readable version: export time plus the file hash's first 12 hex digits."""
        return f"{self.created} sha256:{self.sha256[:12]}"

    def uid(self, *parts: str) -> str:
        """A DICOM UID ``2.25.<uuid5>`` derived from this model file and ``parts``.

        Derived, not random: the same image scored by the same model always gets the same SR and
        heatmap UIDs, so a resend or a restart replaces results instead of duplicating them.
        """
        name = "\x1f".join((self.sha256, *(str(p) for p in parts)))
        return f"2.25.{uuid.uuid5(_UID_NAMESPACE, name).int}"

    @property
    def label_thresholds(self) -> dict[str, float]:
        """The decision threshold of each label: a multilabel model's own per finding (``fedxray.thresholds``,
        chosen on the federation's pooled validation data), else the model's one threshold."""
        try:
            chosen = json.loads(self.extra.get("thresholds", "{}"))
        except ValueError:
            chosen = {}
        chosen = chosen if isinstance(chosen, dict) else {}
        return {label: float(chosen.get(label, self.threshold)) for label in self.labels}

    @property
    def operating_point(self) -> dict[str, Any]:
        """Which rule set the threshold and where (``fedxray.operating_point``): set by the federation on pooled
        validation data, or by a site on its own images (``fl-client accept`` writes a site copy of the model)."""
        try:
            point = json.loads(self.extra.get("operating_point", "{}"))
        except ValueError:
            point = {}
        point = point if isinstance(point, dict) else {}
        return {"rule": str(point.get("rule", "not recorded")), "set_by": str(point.get("set_by", "federation")),
                **({"site": str(point["site"])} if point.get("site") else {}), "threshold": self.threshold}

    @property
    def operating_point_text(self) -> str:
        """For the SR: the operating point and where it was set, and the model's warnings when it has any."""
        point = self.operating_point
        where = f"site {point['site']} on its own images" if point["set_by"] == "site" and "site" in point else \
            "the federation on pooled validation data"
        warned = f" Model warnings: {'; '.join(self.warnings)}." if self.warnings else ""
        return f"Operating point {point['rule']} (threshold {self.threshold:.4g}), set by {where}.{warned}"

    @property
    def warnings(self) -> list[str]:
        """The model's warnings (``fedxray.warnings``): why it is not fit for use, e.g. not for use on patients."""
        try:
            found = json.loads(self.extra.get("warnings", "[]"))
        except ValueError:
            return [self.extra["warnings"]]
        return [str(w) for w in found] if isinstance(found, list) else [str(found)]

    def parameters(self) -> list[str]:
        """Training facts as ``key=value`` strings (the SR's Algorithm Parameters)."""
        point = self.operating_point
        params = [f"task={self.task}", f"threshold={self.threshold:g}", f"rounds={self.rounds}",
                  f"sites={json.dumps(self.sites)}", f"epsilon={json.dumps(self.epsilon, sort_keys=True)}",
                  f"operating_point={point['rule']} set by {point['set_by']}"]
        if self.export_round:
            params.append(f"export_round={self.export_round}")
        return params


@dataclass(frozen=True)
class Scored:
    """One image's result: probabilities per label, the decision, and where the evidence is."""

    probabilities: dict[str, float]
    positive: list[str]  # labels at or above the threshold (multiclass: the most likely class)
    explained_label: str  # the label the attribution map is for
    attribution: NDArray[np.float32] | None  # [h, w] in logit units, None without heatmaps
    model_input: NDArray[np.float32]  # [1, 1, H, W]: what the model saw (drift statistics use it)
    # multilabel: maps for the other findings called positive, most likely first (MAX_HEATMAPS in all)
    more_attributions: dict[str, NDArray[np.float32]] = field(default_factory=dict)
    assessed: bool = True  # False: outside the intended use; no probabilities, no decision, no heatmap
    reason: str = ""  # why not assessed (one line, no patient data)
    rule: str = ""  # which rule refused it (common.intended_use.Verdict.rule)
    ood_score: float | None = None  # the image check's score (None: not computed, or no check in the model)

    @property
    def verdict(self) -> str:
        """The result in a few words, for one log or output line."""
        if not self.assessed:
            return f"not assessed ({self.reason})"
        return "positive " + "+".join(self.positive) if self.positive else "negative"


def not_assessed(model_input: NDArray[np.float32], verdict: Verdict, ood_score: float | None = None) -> Scored:
    """The result of an image outside the intended use: no probability is kept, so none can be shown."""
    return Scored({}, [], "", None, model_input, assessed=False, reason=verdict.reason, rule=verdict.rule, ood_score=ood_score)


class Scorer:
    """Load a fedxray ONNX model once; score display pixels (``common.preprocess.load_pixels``).

    One :class:`~clinic.heatmap.Explainer` pass gives the probabilities and, unless
    ``heatmaps=False``, the attribution map.
    """

    def __init__(self, path: str | os.PathLike[str], *, heatmaps: bool = True, threads: int | None = None,
                 device: str = "cpu", gate: bool = True) -> None:
        self.path = Path(path)
        # model.onnx (fp32 or int8) or its TorchScript twin model.pt (clinic/torchscript.py): same metadata, same interface.
        self.classifier: OnnxClassifier | TorchScriptClassifier = open_model(self.path, threads=threads, device=device)
        data = self.path.read_bytes()
        meta = self.classifier.meta
        known = {"task", "labels", "input_size", "threshold", "model", "rounds", "sites", "epsilon", "created", "export_round"}
        self.identity = ModelIdentity(
            name=str(meta["model"]),
            task=str(meta["task"]),
            labels=list(meta["labels"]),
            threshold=float(meta["threshold"]),
            rounds=int(meta["rounds"]),
            sites=meta["sites"],
            epsilon=dict(meta["epsilon"]),
            created=str(meta["created"]),
            sha256=hashlib.sha256(data).hexdigest(),
            export_round=str(meta.get("export_round", "")),
            extra={k: str(v) for k, v in meta.items() if k not in known},
        )
        # One session computes the probabilities, and the attribution when heatmaps are on; the
        # OnnxClassifier above has checked the file against interface 3 and parsed its metadata.
        if isinstance(self.classifier, TorchScriptClassifier):
            self.explainer: Explainer = TorchScriptExplainer(self.classifier, self.identity.task, attribution=heatmaps)
        else:
            self.explainer = Explainer(data, self.identity.task, threads=threads, attribution=heatmaps,
                                       providers=onnx_providers(device))
        self.heatmaps = heatmaps
        self.gate = gate
        self.ood = self.classifier.ood  # the image check's cut-off (common/ood.py); None: a model exported without it
        if not gate:
            logger.warning("intended-use gate off (--no-gate): every image is scored, also outside the intended use (research only)")
        elif self.ood is None:
            logger.warning("%s has no intended-use image check (exported before it existed: no %s output); "
                           "only the header rules apply", self.path.name, "ood_score")

    @property
    def gate_mode(self) -> str:
        """How images were checked: "on" (header rules and image check), "header-only" (a model without the check), "off"."""
        return "off" if not self.gate else "on" if self.ood is not None else "header-only"

    def check_header(self, header: Dataset | None, shape: tuple[int, ...]) -> Verdict:
        """The header rules (common/intended_use.py) and the matrix of the pixels themselves; ASSESSED with the gate off."""
        if not self.gate:
            return ASSESSED
        min_side = min(self.input_size)
        verdict = check_header(facts_from_dataset(header), min_side=min_side) if header is not None else ASSESSED
        return verdict if not verdict.assessed else check_matrix((int(shape[0]), int(shape[1])), min_side=min_side)

    def regate(self, scored: Scored, header: Dataset | None) -> Scored:
        """``scored`` made not assessed when the header rules refuse ``header`` (a caller that scored pixels only)."""
        if not scored.assessed or header is None:
            return scored
        verdict = self.check_header(header, scored.model_input.shape[-2:])
        return scored if verdict.assessed else not_assessed(scored.model_input, verdict, scored.ood_score)

    @property
    def input_size(self) -> tuple[int, int]:
        return self.classifier.input_size

    @property
    def device(self) -> str:
        """Where scoring actually runs, 'cuda' or 'cpu' (a ``cuda`` request without a GPU fell back, with a warning)."""
        session = self.explainer.session
        return describe_providers(session) if hasattr(session, "get_providers") else "cpu"

    @property
    def heatmap_method(self) -> str | None:
        return self.explainer.method if self.heatmaps else None

    def score(self, pixels: NDArray[np.float32], *, header: Dataset | None = None) -> Scored:
        """Score one display image [H, W] in [0, 1] at native size (resized here, interface 3), behind the gate.

        ``header`` (the DICOM header, no pixel data) feeds the header rules; without it only the
        image check and the matrix rule apply. An image outside the intended use is not scored.
        """
        image = to_model_input(pixels, self.input_size)
        verdict = self.check_header(header, np.shape(pixels))
        if not verdict.assessed:
            logger.debug("not assessed (%s)", verdict.rule)
            return not_assessed(image, verdict)
        ident = self.identity
        batch_probs, maps, ood = self.explainer.run_with_ood(image)
        ood_score = float(ood[0]) if ood is not None else None
        if self.gate and self.ood is not None:
            verdict = check_score(float("nan") if ood_score is None else ood_score, float(self.ood["cutoff"]))
            if not verdict.assessed:
                logger.debug("not assessed (%s)", verdict.rule)
                return not_assessed(image, verdict, ood_score)
        probs = batch_probs[0]
        explained = self._explained_label(probs)
        probabilities = {label: float(p) for label, p in zip(ident.labels, probs)}
        positive = self.decide(probabilities)
        attribution, more = None, {}
        if self.heatmaps:
            def explain(label: str) -> NDArray[np.float32]:
                index = ident.labels.index(label)
                return maps[0, index] if maps is not None else self.explainer.occlusion(image, probs, index)

            attribution = explain(explained)
            if ident.task == "multilabel":  # a reader wants the evidence for every finding called, not only the top one
                others = sorted((label for label in positive if label != explained), key=lambda k: -probabilities[k])
                more = {label: explain(label) for label in others[: MAX_HEATMAPS - 1]}
        return Scored(probabilities, positive, explained, attribution, image, more, ood_score=ood_score)

    def decide(self, probabilities: dict[str, float]) -> list[str]:
        """Labels called positive: ``p >= threshold`` of that label (as common.metrics); multiclass: the argmax."""
        if self.identity.task == "multiclass":
            return [max(probabilities, key=probabilities.__getitem__)]
        thresholds = self.identity.label_thresholds
        return [label for label, p in probabilities.items() if p >= thresholds.get(label, self.identity.threshold)]

    def _explained_label(self, probs: NDArray[np.float32]) -> str:
        """The most likely label: the one a reader wants to see the evidence for."""
        return self.identity.labels[int(np.argmax(probs))]
