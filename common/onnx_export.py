"""Export the final global model to ONNX (DESIGN contract 3) and load it back for inference.

The exported graph is what hospitals run, without torch: input ``image`` float32 [N,1,H,W] in
[0,1] (dynamic N), output ``probabilities`` float32 [N,C] (sigmoid for binary/multilabel,
softmax for multiclass; binary has C=1, the positive finding). The model describes itself
through ``fedxray.*`` metadata props (all strings), so a site needs no side file to know the
labels, input size, threshold and the privacy spent to train it.

An export is only published if onnxruntime reproduces torch within ``tolerance``; otherwise the
file is never written and :class:`ExportError` says by how much it missed ("fail loudly": a
silently wrong model in a hospital is worse than no model).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import uuid
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from numpy.typing import ArrayLike, NDArray
from torch import nn

logger = logging.getLogger(__name__)

__all__ = [
    "INPUT_NAME",
    "OUTPUT_NAME",
    "ExportError",
    "ExportMetadataError",
    "ExportReport",
    "OnnxClassifier",
    "OnnxModelError",
    "export_onnx",
    "load_onnx_model",
]

INPUT_NAME = "image"
OUTPUT_NAME = "probabilities"
TASKS = ("binary", "multiclass", "multilabel")
PREFIX = "fedxray."
# Keys export_onnx fills itself from its arguments (and the clock).
FILLED_KEYS = ("task", "labels", "input_size", "threshold", "created")
# Keys the caller must pass in `metadata` (with or without the "fedxray." prefix).
CALLER_KEYS = ("model", "rounds", "sites", "epsilon")
# Opset 17 is read by every onnxruntime of the last years and has all ops both models need.
OPSET = 17
_PARITY_SEED = 20240611  # fixed so a failing parity check can be reproduced


class ExportError(RuntimeError):
    """The model could not be exported, or the exported graph does not reproduce torch."""


class ExportMetadataError(ExportError, ValueError):
    """Arguments or metadata for the export are missing or malformed (lists every problem)."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"cannot export ONNX model ({len(self.problems)} problem(s)):\n{lines}")


class OnnxModelError(ValueError):
    """An ONNX file is not a fedxray model (wrong input/output, missing metadata) or the images
    given to it do not match what it expects."""


@dataclass(frozen=True)
class ExportReport:
    """What was written and how closely onnxruntime matches torch."""

    path: Path
    max_abs_diff: float  # max |p_onnx - p_torch| over the parity batches (probabilities)
    opset: int
    n_params: int  # trainable + frozen parameters of the torch model
    size_bytes: int  # size of the .onnx file


class _ProbabilityModel(nn.Module):
    """The torch model followed by the task's link function, so the graph outputs probabilities."""

    def __init__(self, model: nn.Module, task: str) -> None:
        super().__init__()
        self.model = model
        self.task = task

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        logits = self.model(image)
        if self.task == "multiclass":
            return torch.softmax(logits, dim=1)
        return torch.sigmoid(logits)


# --------------------------------------------------------------------------- validation


def _normalise_metadata(metadata: Mapping[str, Any], problems: list[str]) -> dict[str, str]:
    """Prefix every key with ``fedxray.`` and check values are strings."""
    out: dict[str, str] = {}
    given = {key if key.startswith(PREFIX) else PREFIX + key for key in metadata}
    for key, value in metadata.items():
        full = key if key.startswith(PREFIX) else PREFIX + key
        if full[len(PREFIX) :] in FILLED_KEYS:
            problems.append(
                f"metadata key {key!r} is filled by export_onnx itself; pass it as the "
                f"{full[len(PREFIX) :]}= argument instead (created is the export time)"
            )
            continue
        if not isinstance(value, str):
            problems.append(
                f"metadata {key!r} must be a string (ONNX props are strings), got "
                f"{type(value).__name__}; e.g. json.dumps(...) for dicts, str(...) for numbers"
            )
            continue
        out[full] = value
    missing = [PREFIX + k for k in CALLER_KEYS if PREFIX + k not in given]
    if missing:
        problems.append(f"metadata lacks required key(s) {', '.join(missing)}")
    if PREFIX + "rounds" in out:
        try:
            int(out[PREFIX + "rounds"])
        except ValueError:
            problems.append(f"fedxray.rounds must be an integer string, got {out[PREFIX + 'rounds']!r}")
    if PREFIX + "epsilon" in out:
        try:
            eps = json.loads(out[PREFIX + "epsilon"])
            if not isinstance(eps, dict) or not all(
                v is None or (isinstance(v, int | float) and not isinstance(v, bool)) for v in eps.values()
            ):
                raise TypeError
        except (ValueError, TypeError):
            problems.append(
                "fedxray.epsilon must be a JSON object site -> epsilon spent (a number, or null for "
                f"a site without DP), e.g. '{{\"site-a\": 2.1}}', got {out[PREFIX + 'epsilon']!r}"
            )
    return out


def _valid_size(input_size: object) -> bool:
    return (
        isinstance(input_size, Sequence)
        and len(input_size) == 2
        and all(isinstance(v, int | np.integer) and not isinstance(v, bool) and v > 0 for v in input_size)
    )


def _check_arguments(
    task: str,
    labels: Sequence[str],
    input_size: Sequence[int],
    threshold: float,
    problems: list[str],
) -> None:
    if task not in TASKS:
        problems.append(f"task must be one of {TASKS}, got {task!r}")
    if not labels or not all(isinstance(x, str) and x for x in labels):
        problems.append(f"labels must be a non-empty list of non-empty strings, got {labels!r}")
    elif len(set(labels)) != len(labels):
        problems.append(f"labels must be unique, got {list(labels)}")
    elif task == "binary" and len(labels) != 1:
        problems.append(
            f"a binary task has one output, the positive finding; got {len(labels)} labels {list(labels)}. Pass labels=[<positive finding>]"
        )
    elif task == "multiclass" and len(labels) < 2:
        problems.append(f"a multiclass task needs at least 2 labels, got {list(labels)}")
    if not _valid_size(input_size):
        problems.append(f"input_size must be (H, W) positive ints, got {input_size!r}")
    if not (isinstance(threshold, int | float) and math.isfinite(threshold) and 0 <= threshold <= 1):
        problems.append(f"threshold must be a probability in [0, 1], got {threshold!r}")


# --------------------------------------------------------------------------- export


def _torch_export(wrapped: nn.Module, example: torch.Tensor, path: Path) -> None:
    """Write the graph with the TorchScript-based exporter (``dynamo=False``).

    Why not the default dynamo exporter: on this 2-core machine it took 14.5 s for MobileNetV2
    at 32 px against 3.6 s here (notes: 7.8 s vs 0.4 s at 224 px), printed progress to stdout,
    and left an empty ``.onnx.data`` side file; both gave bit-identical outputs. torch 2.14 still
    ships the TorchScript exporter (it warns that it is deprecated); the parity check below is
    what guards correctness either way. If a future torch drops it, switch to
    ``dynamo=True, dynamic_shapes=({0: torch.export.Dim("batch")},)``.
    """
    with warnings.catch_warnings():
        # Only the two deprecation notices of the legacy path; anything else still shows.
        warnings.filterwarnings(
            "ignore",
            message=r"You are using the legacy TorchScript-based ONNX export",
            category=DeprecationWarning,
        )
        warnings.filterwarnings("ignore", message=r"The feature will be removed", category=DeprecationWarning)
        # The reflect padding's exporter reverses its pad list with a step -1 Slice and says it cannot fold it.
        warnings.filterwarnings("ignore", message=r"Constant folding - Only steps=1", category=UserWarning)
        torch.onnx.export(
            wrapped,
            (example,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )


def _parity_batches(input_size: tuple[int, int], sample_batch: torch.Tensor | None) -> list[torch.Tensor]:
    """Random images in [0,1] (3 of them: not the traced batch size, so the dynamic batch axis is
    exercised) plus the caller's real images when given."""
    gen = torch.Generator().manual_seed(_PARITY_SEED)
    batches = [torch.rand((3, 1, *input_size), generator=gen)]
    if sample_batch is not None:
        batches.append(sample_batch.detach().to("cpu", torch.float32))
    return batches


def _max_abs_diff(wrapped: nn.Module, path: Path, batches: list[torch.Tensor]) -> float:
    """Largest |onnxruntime - torch| over all batches, on CPU."""
    # One thread: a handful of images gains nothing from more, and on a shared CPU the spinning
    # of a multi-threaded pool can make this check seconds slower.
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    worst = 0.0
    with torch.inference_mode():
        for batch in batches:
            expected = wrapped(batch).numpy()
            got = session.run([OUTPUT_NAME], {INPUT_NAME: batch.numpy()})[0]
            if got.shape != expected.shape:
                raise ExportError(
                    f"onnxruntime output shape {got.shape} differs from torch {expected.shape} "
                    f"for a batch of {batch.shape[0]}: the batch axis is probably not dynamic"
                )
            worst = max(worst, float(np.max(np.abs(got.astype(np.float64) - expected))))
    return worst


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    task: str,
    labels: list[str],
    input_size: tuple[int, int],
    threshold: float,
    metadata: Mapping[str, str],
    sample_batch: torch.Tensor | None = None,
    tolerance: float = 1e-4,
) -> ExportReport:
    """Export ``model`` (images [N,1,H,W] in [0,1] -> logits [N,C]) to ``path`` as contract 3.

    ``metadata`` must hold model, rounds, sites and epsilon (keys with or without the
    ``fedxray.`` prefix; string values, epsilon as a JSON object site -> epsilon); extra string
    keys are kept. task/labels/input_size/threshold/created are filled from the arguments.
    The caller's model is not modified (a CPU copy in eval mode is exported). The file appears
    atomically and only after onnx.checker and a parity check against torch on random images
    (and ``sample_batch``) within ``tolerance`` (absolute, on probabilities) have passed.
    """
    problems: list[str] = []
    _check_arguments(task, labels, input_size, threshold, problems)
    props = _normalise_metadata(metadata, problems)
    if (
        sample_batch is not None
        and _valid_size(input_size)
        and (sample_batch.ndim != 4 or tuple(sample_batch.shape[1:]) != (1, *tuple(input_size)))
    ):
        problems.append(f"sample_batch must be [N,1,{input_size[0]},{input_size[1]}] like the model input, got {list(sample_batch.shape)}")
    if problems:
        raise ExportMetadataError(problems)
    input_size = (int(input_size[0]), int(input_size[1]))

    wrapped = _ProbabilityModel(copy.deepcopy(model).to("cpu").eval(), task).eval()
    example = torch.rand((2, 1, *input_size), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        out = wrapped.model(example)
    if out.ndim != 2 or out.shape[1] != len(labels):
        raise ExportMetadataError(
            [
                f"the model returns shape {list(out.shape)} for 2 images but {len(labels)} label(s) "
                f"{labels} need [2, {len(labels)}] logits; build it with num_outputs={len(labels)}"
            ]
        )

    props.update(
        {
            PREFIX + "task": task,
            PREFIX + "labels": json.dumps(list(labels)),
            PREFIX + "input_size": f"{input_size[0]},{input_size[1]}",
            PREFIX + "threshold": repr(float(threshold)),
            PREFIX + "created": datetime.now(UTC).isoformat(timespec="seconds"),
        }
    )

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Same folder, so os.replace is atomic; created by the exporter, so the umask applies.
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        try:
            _torch_export(wrapped, example, tmp)
        except Exception as err:  # the exporter raises many types; report them as one
            raise ExportError(f"torch.onnx.export failed for {type(model).__name__}: {err}") from err
        proto = onnx.load(str(tmp))
        onnx.helper.set_model_props(proto, {**_existing_props(proto), **props})
        proto.doc_string = "fedxray chest X-ray classifier: image [N,1,H,W] in [0,1] -> probabilities"
        onnx.save(proto, str(tmp))
        try:
            onnx.checker.check_model(str(tmp), full_check=True)
        except onnx.checker.ValidationError as err:
            raise ExportError(f"onnx.checker rejected the exported graph: {err}") from err
        diff = _max_abs_diff(wrapped, tmp, _parity_batches(input_size, sample_batch))
        if not diff <= tolerance:  # also catches nan
            raise ExportError(
                f"onnxruntime differs from torch by {diff:.3g} (max abs, probabilities), above "
                f"the tolerance {tolerance:.3g}; {target} was not written. Check for layers that "
                "behave differently in eval mode or ops the exporter does not support."
            )
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)

    report = ExportReport(
        path=target,
        max_abs_diff=diff,
        opset=OPSET,
        n_params=sum(p.numel() for p in model.parameters()),
        size_bytes=target.stat().st_size,
    )
    logger.info(
        "exported %s (%s, %d params, %.1f MB) to %s; max |onnx - torch| = %.2g",
        props[PREFIX + "model"],
        task,
        report.n_params,
        report.size_bytes / 1e6,
        target,
        diff,
    )
    return report


def _existing_props(proto: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in proto.metadata_props}


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
    ``raw_meta`` keeps every metadata prop exactly as stored.
    """

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
            raise OnnxModelError(
                f"{self._where} expects images [N,1,{h},{w}] (grey, resized whole image, bilinear); got shape {list(x.shape)}"
            )
        if x.size and (float(x.min()) < -1e-6 or float(x.max()) > 1 + 1e-6):
            raise OnnxModelError(
                f"{self._where} expects pixel values in [0,1] as read_radiograph gives them; got "
                f"range [{float(x.min()):.4g}, {float(x.max()):.4g}] (8-bit images: divide by 255)"
            )
        chunks = [self.session.run([OUTPUT_NAME], {INPUT_NAME: x[i : i + batch_size]})[0] for i in range(0, x.shape[0], batch_size)]
        if not chunks:
            return np.zeros((0, len(self.labels)), dtype=np.float32)
        return np.concatenate(chunks).astype(np.float32, copy=False)


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


def reference_batch(folder: str | Path, input_size: tuple[int, int], limit: int = 16) -> torch.Tensor:
    """Up to ``limit`` radiographs from ``folder`` as [N,1,H,W], read and resized as sites read them.

    The parity check should see real radiographs, not only noise: their intensity histograms and
    structure exercise the network the way deployment will. The coordinator holds no patient data,
    so this is a folder of reference images it may keep (public or synthetic radiographs). Files
    that cannot be read are skipped; none readable raises ``ExportError``.
    """
    from common.dicom import DicomError, read_radiograph
    from common.images import ImageError, is_image_file, read_image, resize_image

    root = Path(folder)
    if not root.is_dir():
        raise ExportError(f"parity-data {root} is not a folder: point it at reference radiographs the coordinator holds")
    images = []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() not in (".csv", ".json", ".md", ".txt")):
        try:
            pixels = read_image(path) if is_image_file(path) else read_radiograph(path).pixels
        except (DicomError, ImageError, ValueError):
            continue
        images.append(resize_image(pixels, input_size))
        if len(images) >= limit:
            break
    if not images:
        raise ExportError(f"no readable radiograph in parity-data {root}")
    return torch.from_numpy(np.stack(images).astype(np.float32))[:, None]
