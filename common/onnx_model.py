"""Loading a fedxray ONNX model for inference (split out of common/onnx_export.py, which re-exports it).

The graph a site or the clinic runs, without torch: input ``image`` float32 [N,1,H,W] in [0,1]
(dynamic N), output ``probabilities`` float32 [N,C]. The model describes itself through
``fedxray.*`` metadata props (all strings); :func:`load_onnx_model` checks the input and output
names and parses them into :attr:`OnnxClassifier.meta`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from numpy.typing import ArrayLike, NDArray

from common.intended_use import OOD_OUTPUT, parse_ood_metadata

__all__ = [
    "INPUT_NAME",
    "OUTPUT_NAME",
    "OnnxClassifier",
    "OnnxModelError",
    "load_onnx_model",
]

INPUT_NAME = "image"
OUTPUT_NAME = "probabilities"
PREFIX = "fedxray."
# Keys export_onnx fills itself from its arguments (and the clock).
FILLED_KEYS = ("task", "labels", "input_size", "threshold", "created")
# Keys the caller must pass in `metadata` (with or without the "fedxray." prefix).
CALLER_KEYS = ("model", "rounds", "sites", "epsilon")


class OnnxModelError(ValueError):
    """An ONNX file is not a fedxray model (wrong input/output, missing metadata) or the images
    given to it do not match what it expects."""


# --------------------------------------------------------------------------- loading


def _parse_meta(raw: Mapping[str, str], where: str) -> dict[str, Any]:
    """fedxray.* props -> typed dict without the prefix (labels list, input_size tuple, ...)."""
    missing = [PREFIX + k for k in (*FILLED_KEYS, *CALLER_KEYS) if PREFIX + k not in raw]
    if missing:
        raise OnnxModelError(
            f"{where} is not a fedxray model: metadata lacks {', '.join(missing)}; export it with common.onnx_export.export_onnx"
        )
    meta: dict[str, Any] = {k[len(PREFIX) :]: v for k, v in raw.items() if k.startswith(PREFIX)}
    try:
        meta["labels"] = list(json.loads(meta["labels"]))
        h, w = (int(v) for v in meta["input_size"].split(","))
        meta["input_size"] = (h, w)
        meta["threshold"] = float(meta["threshold"])
        meta["rounds"] = int(meta["rounds"])
        meta["epsilon"] = {str(k): None if v is None else float(v) for k, v in json.loads(meta["epsilon"]).items()}
    except (ValueError, TypeError, AttributeError) as err:
        raise OnnxModelError(f"{where} has malformed fedxray metadata: {err}") from err
    try:  # sites is free-form (a count or a JSON list); keep JSON structure when it is JSON
        meta["sites"] = json.loads(meta["sites"])
    except ValueError:
        pass
    return meta


class OnnxClassifier:
    """A fedxray ONNX model in onnxruntime: ``predict(images) -> probabilities`` plus ``meta``.

    ``meta`` holds the fedxray.* props without the prefix, parsed: task (str), labels (list),
    input_size ((H, W)), threshold (float), model (str), rounds (int), sites (JSON value or
    str), epsilon (dict site -> float, None for a site without DP), created (ISO-8601 str),
    plus any extra keys as strings.
    ``raw_meta`` keeps every metadata prop exactly as stored. :attr:`ood` is the intended-use image
    check (the ``ood_score`` output and its cut-off), None for a model exported without it.
    """

    _error: type[OnnxModelError] = OnnxModelError  # what predict raises on bad input (a subclass per format)

    def __init__(self, session: ort.InferenceSession, raw_meta: dict[str, str], where: str) -> None:
        self.session = session
        self.raw_meta = raw_meta
        self.meta = _parse_meta(raw_meta, where)
        self._where = where

    @property
    def labels(self) -> list[str]:
        return list(self.meta["labels"])

    @property
    def input_size(self) -> tuple[int, int]:
        return tuple(self.meta["input_size"])  # type: ignore[return-value]

    def predict(self, images: ArrayLike, *, batch_size: int = 32) -> NDArray[np.float32]:
        """Probabilities [N,C] for images float32 [N,1,H,W] in [0,1] at the model's input size.

        Runs in chunks of ``batch_size`` to bound memory.
        """
        x = np.asarray(images, dtype=np.float32)
        h, w = self.input_size
        if x.ndim != 4 or x.shape[1:] != (1, h, w):
            raise self._error(
                f"{self._where} expects images [N,1,{h},{w}] (grey, resized whole image, bilinear); got shape {list(x.shape)}"
            )
        if x.size and (float(x.min()) < -1e-6 or float(x.max()) > 1 + 1e-6):
            raise self._error(
                f"{self._where} expects pixel values in [0,1] as read_radiograph gives them; got "
                f"range [{float(x.min()):.4g}, {float(x.max()):.4g}] (8-bit images: divide by 255)"
            )
        chunks = [self.session.run([OUTPUT_NAME], {INPUT_NAME: x[i : i + batch_size]})[0] for i in range(0, x.shape[0], batch_size)]
        if not chunks:
            return np.zeros((0, len(self.labels)), dtype=np.float32)
        return np.concatenate(chunks).astype(np.float32, copy=False)

    def _has_ood_output(self) -> bool:
        return OOD_OUTPUT in [o.name for o in self.session.get_outputs()]

    @property
    def ood(self) -> dict[str, Any] | None:
        """The parsed ``fedxray.ood`` metadata (``cutoff`` ...) when the graph has the ``ood_score`` output, else None."""
        meta = parse_ood_metadata(self.raw_meta)
        return meta if meta is not None and self._has_ood_output() else None

    def ood_scores(self, images: ArrayLike, *, batch_size: int = 32) -> NDArray[np.float32] | None:
        """The image check's scores [N] for model inputs [N,1,H,W] (None for a model without the check)."""
        if self.ood is None:
            return None
        x = np.asarray(images, dtype=np.float32)
        chunks = [self.session.run([OOD_OUTPUT], {INPUT_NAME: x[i : i + batch_size]})[0] for i in range(0, x.shape[0], batch_size)]
        return np.concatenate(chunks).astype(np.float32, copy=False) if chunks else np.zeros(0, np.float32)


def load_onnx_model(
    path: str | os.PathLike[str],
    *,
    threads: int | None = None,
    providers: Sequence[str] = ("CPUExecutionProvider",),
) -> OnnxClassifier:
    """Open a fedxray ONNX model for inference (``threads``: intra-op threads, None = ORT default)."""
    where = str(path)
    if not Path(path).is_file():
        raise OnnxModelError(f"ONNX model {where} not found")
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    try:
        session = ort.InferenceSession(where, sess_options=options, providers=list(providers))
    except Exception as err:  # onnxruntime raises its own non-builtin exception types
        raise OnnxModelError(f"onnxruntime cannot open {where}: {err}") from err
    inputs = [i.name for i in session.get_inputs()]
    outputs = [o.name for o in session.get_outputs()]
    if inputs != [INPUT_NAME] or OUTPUT_NAME not in outputs:
        raise OnnxModelError(
            f"{where} has inputs {inputs} and outputs {outputs}; a fedxray model has input {INPUT_NAME!r} and output {OUTPUT_NAME!r}"
        )
    raw = dict(session.get_modelmeta().custom_metadata_map)
    return OnnxClassifier(session, raw, where)
