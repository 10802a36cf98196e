"""TorchScript twin of the exported ONNX model: ``model.pt`` beside ``model.onnx`` (issue 12, item 5).

For a site that runs torch (C++ libtorch, or Python without onnxruntime) the same model as a
TorchScript archive: input ``image`` float32 [N,1,H,W] in [0,1] (any N), output probabilities
float32 [N,C], exactly interface 3, docs/interfaces.md. It carries the ONNX file's ``fedxray.*`` metadata
props unchanged (labels, threshold, calibration, epsilon per site, rounds, provenance, drift
reference ...): one JSON object in the archive's extra file :data:`METADATA_FILE`, read back
with ``torch.jit.load(path, _extra_files={METADATA_FILE: ""})`` (or libtorch's
``ExtraFilesMap``). The metadata is copied from the ONNX file after it was written, so the two
artefacts cannot describe themselves differently.

The module is made with ``torch.jit.trace``, not ``torch.jit.script``: none of the three
architectures scripts (the scattering front end names its DFT buffers at run time and keys
order-2 blocks by tuples, and ``2**J`` is a float to the script compiler; the CNN wrappers build
their input-check messages from ``tuple(x.shape)``), while all three trace to a graph without
data-dependent control flow. The input checks are Python and are not in the trace; the
classifier below checks inputs instead.

Like the ONNX export, the file is published only after it proves itself: the archive is loaded
back and must reproduce torch eager within ``tolerance`` on random images (batch 3, not the
traced 2, so a batch size baked into the trace is caught) and the caller's reference batch;
otherwise :class:`~common.onnx_export.ExportError` says by how much it missed, and no file is
written.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
import warnings
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from numpy.typing import NDArray
from torch import nn

from common.onnx_export import (
    INPUT_NAME,
    OUTPUT_NAME,
    PREFIX,
    ExportError,
    OnnxClassifier,
    OnnxModelError,
    _parity_batches,
    _parse_meta,
    _ProbabilityModel,
)
from common.ood_export import OOD_OUTPUT, OOD_TOLERANCE, TracedWithOod, copy_with_ood, ood_difference

logger = logging.getLogger(__name__)

__all__ = [
    "METADATA_FILE",
    "TorchScriptClassifier",
    "TorchScriptModelError",
    "TorchScriptReport",
    "export_torchscript",
    "is_torchscript",
    "load_torchscript_model",
]

#: Extra file in the TorchScript archive holding the fedxray.* props as one JSON object (str -> str).
METADATA_FILE = "fedxray.json"
# torch 2.14 marks torch.jit.trace/save/load deprecated (FutureWarning, "switch to torch.compile or
# torch.export"); they still work, and libtorch deployments read exactly this format. Only that notice
# is silenced, so fl-predict's stderr stays one line per problem.
_DEPRECATED = r"`torch\.jit\.\w+` is deprecated"


class TorchScriptModelError(OnnxModelError):
    """A file is not a fedxray TorchScript model, or the images given to it do not fit it."""


@dataclass(frozen=True)
class TorchScriptReport:
    """What was written and how closely the reloaded TorchScript module matches torch eager."""

    path: Path
    max_abs_diff: float  # max |p_torchscript - p_eager| over the parity batches (probabilities)
    size_bytes: int
    method: str  # "trace"


def export_torchscript(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    onnx_model: str | os.PathLike[str],
    sample_batch: torch.Tensor | None = None,
    tolerance: float = 1e-4,
    ood: nn.Module | None = None,
) -> TorchScriptReport:
    """Write ``model`` (images -> logits, the one just exported to ``onnx_model``) as TorchScript to ``path``.

    Task, input size and every ``fedxray.*`` prop come from ``onnx_model`` (an export of
    :func:`common.onnx_export.export_onnx`), so call this right after it with the same model
    and reference batch. The caller's model is not modified. The file appears atomically and only
    after the parity check within ``tolerance`` (absolute, on probabilities) has passed.
    ``ood``: the image check's score module (as given to export_onnx), traced as the method ``ood_score``.
    """
    source = Path(onnx_model)
    try:
        proto = onnx.load(str(source), load_external_data=False)
    except Exception as err:  # onnx raises DecodeError, OSError, ...
        raise ExportError(f"cannot read the ONNX model {source} whose metadata model.pt copies: {err}") from err
    props = {p.key: p.value for p in proto.metadata_props if p.key.startswith(PREFIX)}
    try:
        meta = _parse_meta(props, str(source))
    except OnnxModelError as err:
        raise ExportError(str(err)) from err
    input_size: tuple[int, int] = meta["input_size"]
    if sample_batch is not None and tuple(sample_batch.shape[1:]) != (1, *input_size):
        raise ExportError(f"sample_batch must be [N,1,{input_size[0]},{input_size[1]}] like the model input, "
                          f"got {list(sample_batch.shape)}")

    model_copy, ood_copy = copy_with_ood(model, ood)
    wrapped = _ProbabilityModel(model_copy, meta["task"]).eval()
    traced_model = wrapped if ood_copy is None else TracedWithOod(wrapped, ood_copy).eval()
    example = torch.rand((2, 1, *input_size), generator=torch.Generator().manual_seed(0))
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        try:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.filterwarnings("ignore", message=_DEPRECATED, category=FutureWarning)
                # Shapes read in Python (input checks, GroupNorm's batch check, the scattering's DFT matrix per
                # spatial side) become constants of the trace: right for the fixed H, W; a batch size baked in
                # is what the parity check at batch 3 (traced at 2) catches.
                warnings.filterwarnings("ignore", message=r"Converting a tensor to a Python (boolean|number|index)",
                                        category=torch.jit.TracerWarning)
                if ood_copy is None:
                    traced = torch.jit.trace(wrapped, example, check_trace=False)
                else:
                    traced = torch.jit.trace_module(traced_model, {"forward": example, OOD_OUTPUT: example}, check_trace=False)
                torch.jit.save(traced, str(tmp), _extra_files={METADATA_FILE: json.dumps(props, sort_keys=True)})
        except Exception as err:  # tracing raises many types; report them as one
            raise ExportError(f"torch.jit.trace failed for {type(model).__name__}: {err}") from err
        diff = _max_abs_diff(traced_model, tmp, _parity_batches(input_size, sample_batch))
        if not diff <= tolerance:  # also catches nan
            raise ExportError(
                f"TorchScript differs from torch eager by {diff:.3g} (max abs, probabilities), above the tolerance "
                f"{tolerance:.3g}; {target} was not written. Look for Python control flow on tensor values or "
                "shapes in forward(): a trace records one path only."
            )
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    report = TorchScriptReport(path=target, max_abs_diff=diff, size_bytes=target.stat().st_size, method="trace")
    logger.info("exported TorchScript %s (%.1f MB) to %s; max |torchscript - torch| = %.2g",
                meta["model"], report.size_bytes / 1e6, target, diff)
    return report


def _max_abs_diff(wrapped: nn.Module, path: Path, batches: list[torch.Tensor]) -> float:
    """Largest |reloaded TorchScript - torch eager| over all batches (the file is what is checked)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_DEPRECATED, category=FutureWarning)
        loaded = torch.jit.load(str(path), map_location="cpu")
    worst = 0.0
    with torch.inference_mode():
        for batch in batches:
            expected = wrapped(batch)
            got = loaded(batch)
            ood_diff = ood_difference(wrapped.ood_score(batch), loaded.ood_score(batch).numpy()) \
                if isinstance(wrapped, TracedWithOod) else 0.0
            if not ood_diff <= OOD_TOLERANCE:
                raise ExportError(f"TorchScript's {OOD_OUTPUT} differs from torch eager above {OOD_TOLERANCE:g} (relative)")
            if got.shape != expected.shape:
                raise ExportError(f"TorchScript output shape {list(got.shape)} differs from torch {list(expected.shape)} "
                                  f"for a batch of {batch.shape[0]}: the trace fixed the batch size")
            worst = max(worst, float((got.double() - expected.double()).abs().max()))
    return worst


# --------------------------------------------------------------------------- loading


def is_torchscript(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` is a zip archive (TorchScript, also a plain ``torch.save``); ONNX files are protobuf."""
    return Path(path).is_file() and zipfile.is_zipfile(path)


class _Session:
    """``run(output_names, feeds)`` over a TorchScript module, as onnxruntime's InferenceSession has it."""

    def __init__(self, module: torch.jit.ScriptModule) -> None:
        self.module = module

    def has_ood(self) -> bool:
        return bool(self.module._c._has_method(OOD_OUTPUT))

    def run(self, output_names: Sequence[str] | None, feeds: dict[str, NDArray[np.float32]]) -> list[NDArray[np.float32]]:
        names = [OUTPUT_NAME] if output_names is None else list(output_names)
        known = [OUTPUT_NAME, OOD_OUTPUT] if self.has_ood() else [OUTPUT_NAME]
        if not names or any(n not in known for n in names) or list(feeds) != [INPUT_NAME]:
            raise TorchScriptModelError(f"a fedxray TorchScript model has input {INPUT_NAME!r} and outputs {known} only")
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(feeds[INPUT_NAME], dtype=np.float32))
            outs = [self.module(x) if n == OUTPUT_NAME else self.module.ood_score(x) for n in names]
        return [out.numpy().astype(np.float32, copy=False) for out in outs]


class TorchScriptClassifier(OnnxClassifier):
    """A fedxray TorchScript model: the interface of :class:`common.onnx_export.OnnxClassifier`.

    ``meta`` / ``raw_meta`` as there (parsed from :data:`METADATA_FILE`); ``session.run`` as
    onnxruntime's, so code written for the ONNX session (occlusion maps) runs on it unchanged.
    """

    _error = TorchScriptModelError

    def _has_ood_output(self) -> bool:
        return self.session.has_ood()  # type: ignore[attr-defined]

    def __init__(self, module: torch.jit.ScriptModule, raw_meta: dict[str, str], where: str) -> None:
        self.session = _Session(module)
        self.raw_meta = raw_meta
        try:
            self.meta = _parse_meta(raw_meta, where)
        except OnnxModelError as err:
            raise TorchScriptModelError(str(err)) from err
        self._where = where


def load_torchscript_model(path: str | os.PathLike[str]) -> TorchScriptClassifier:
    """Open a fedxray ``model.pt`` for inference on CPU (torch's threads are the process' setting: the caller's choice)."""
    where = str(path)
    if not Path(path).is_file():
        raise TorchScriptModelError(f"TorchScript model {where} not found")
    extra = {METADATA_FILE: ""}
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_DEPRECATED, category=FutureWarning)
            module = torch.jit.load(where, map_location="cpu", _extra_files=extra)
    except Exception as err:  # torch raises RuntimeError and others for a non-TorchScript zip
        raise TorchScriptModelError(
            f"torch cannot load {where} as TorchScript ({type(err).__name__}): a state_dict saved with torch.save is not a model; "
            "use the model.pt that fl-server writes beside model.onnx"
        ) from err
    if not extra[METADATA_FILE]:
        raise TorchScriptModelError(f"{where} is TorchScript but not a fedxray model: it has no {METADATA_FILE}; "
                                    "export it with common.torchscript_export.export_torchscript")
    try:
        raw = json.loads(extra[METADATA_FILE])
        if not isinstance(raw, dict):
            raise TypeError
    except (ValueError, TypeError) as err:
        raise TorchScriptModelError(f"{where} has a malformed {METADATA_FILE}: expected a JSON object of strings") from err
    module.eval()
    return TorchScriptClassifier(module, {str(k): str(v) for k, v in raw.items()}, where)
