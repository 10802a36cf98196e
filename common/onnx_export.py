"""Export the final global model to ONNX (interface 3, docs/interfaces.md), checked for parity with torch.

Loading it back for inference (:func:`load_onnx_model`, :class:`OnnxClassifier`) is
common/onnx_model.py; every name is re-exported here.

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
from torch import nn

from common.onnx_model import CALLER_KEYS as CALLER_KEYS
from common.onnx_model import FILLED_KEYS as FILLED_KEYS
from common.onnx_model import INPUT_NAME as INPUT_NAME
from common.onnx_model import OUTPUT_NAME as OUTPUT_NAME
from common.onnx_model import PREFIX as PREFIX
from common.onnx_model import OnnxClassifier as OnnxClassifier
from common.onnx_model import OnnxModelError as OnnxModelError
from common.onnx_model import _parse_meta as _parse_meta
from common.onnx_model import load_onnx_model as load_onnx_model
from common.ood_export import OOD_OUTPUT, OOD_TOLERANCE, WithOod, copy_with_ood, ood_difference

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

TASKS = ("binary", "multiclass", "multilabel")
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


def _torch_export(wrapped: nn.Module, example: torch.Tensor, path: Path, outputs: tuple[str, ...] = (OUTPUT_NAME,)) -> None:
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
            output_names=list(outputs),
            dynamic_axes={INPUT_NAME: {0: "batch"}, **{name: {0: "batch"} for name in outputs}},
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
            expected, ood = wrapped(batch) if isinstance(wrapped, WithOod) else (wrapped(batch), None)
            expected = expected.numpy()
            got, *ood_got = session.run([OUTPUT_NAME] if ood is None else [OUTPUT_NAME, OOD_OUTPUT], {INPUT_NAME: batch.numpy()})
            if ood is not None and not ood_difference(ood, ood_got[0]) <= OOD_TOLERANCE:
                raise ExportError(f"onnxruntime's {OOD_OUTPUT} differs from torch by {ood_difference(ood, ood_got[0]):.3g} "
                                  f"(relative), above {OOD_TOLERANCE:g}: the image check would not be the one the sites calibrated")
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
    ood: nn.Module | None = None,
) -> ExportReport:
    """Export ``model`` (images [N,1,H,W] in [0,1] -> logits [N,C]) to ``path`` as interface 3.

    ``ood`` (common.ood.OodScore, sharing the model's front end) adds the second output
    ``ood_score`` [N] (common/ood_export.py); ``metadata`` must then hold ``ood`` (its cut-off, JSON).

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
    if (ood is None) == (PREFIX + "ood" in props):
        problems.append("an ood score module and the fedxray.ood metadata (its cut-off) go together: pass both or neither")
    if problems:
        raise ExportMetadataError(problems)
    input_size = (int(input_size[0]), int(input_size[1]))

    model_copy, ood_copy = copy_with_ood(model, ood)
    wrapped = _ProbabilityModel(model_copy, task).eval()
    exported = wrapped if ood_copy is None else WithOod(wrapped, ood_copy)
    outputs = (OUTPUT_NAME,) if ood_copy is None else (OUTPUT_NAME, OOD_OUTPUT)
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
            _torch_export(exported, example, tmp, outputs)
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
        diff = _max_abs_diff(exported, tmp, _parity_batches(input_size, sample_batch))
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
