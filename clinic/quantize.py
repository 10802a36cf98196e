"""int8 models for CPUs: ``fl-predict quantize --model model.onnx --out model.int8.onnx``.

Two onnxruntime methods:

* ``dynamic`` (default): weights int8 ahead of time, activations quantised per batch at run
  time; needs no calibration images. It only quantises MatMul/Gemm whose weight is a constant
  on the right, which is what transformer-like graphs have.
* ``static``: weights and activations int8 (QDQ format, per-channel weights), activation ranges
  calibrated on ``--calibration DIR`` (images the hospital trusts, read through the one image
  path). The method for convolutional models (DenseNet121, MobileNetV2): Conv is quantised.

Large ``Constant`` nodes (the scattering front end's DFT matrices) are first turned into
initializers, the form the quantiser recognises as weights; the graph computes the same. The
last linear layer (the one before the sigmoid/softmax), with its Flatten and pooling, is kept
in float: it is tiny, and keeping it lets :mod:`clinic.heatmap` decompose the logit exactly on
the int8 model too. The ``fedxray.*`` metadata is copied, plus ``fedxray.quantization`` saying
what was done, so an int8 file still describes itself (labels, threshold, epsilon).

Whether int8 pays off depends on the graph: benchmarks/predict_latency.py measures latency and
the AUC change on held-out images; docs/clinic.md has the figures.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from clinic.heatmap import calibration_nodes, find_linear_head
from common.onnx_export import INPUT_NAME, OUTPUT_NAME, load_onnx_model

METHODS = ("dynamic", "static")

logger = logging.getLogger(__name__)

QUANT_KEY = "fedxray.quantization"


class QuantizeError(RuntimeError):
    """The model could not be quantised (the message says why and what to try)."""


def quantize_model(
    model: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    method: str = "dynamic",
    calibration: list[np.ndarray] | None = None,
    op_types: tuple[str, ...] | None = None,
) -> Path:
    """Write an int8 copy of ``model`` to ``out``; returns the path.

    ``calibration`` (static only): model inputs [1, 1, H, W] from trusted images. The source must
    be a fedxray model (checked by loading it); the result is loaded back and checked the same
    way before it replaces ``out``, so a file that fl-predict cannot read is never left.
    """
    if method not in METHODS:
        raise QuantizeError(f"unknown quantisation method {method!r}: use one of {', '.join(METHODS)}")
    if method == "static" and not calibration:
        raise QuantizeError("static quantisation needs calibration images: pass --calibration DIR (a few dozen trusted radiographs)")
    source = Path(model)
    target = Path(out)
    load_onnx_model(source)  # raises OnnxModelError for anything that is not a fedxray model
    proto = onnx.load(str(source))
    props = {p.key: p.value for p in proto.metadata_props}
    _constants_to_initializers(proto)
    # Static: every op onnxruntime can quantise (Conv, and also Relu/Clip/Add/pooling), so the graph stays
    # in int8 between convolutions instead of converting back to float around each (measured: only
    # then is MobileNetV2 at 224 px about 2x faster).
    ops = list(op_types) if op_types else (["MatMul", "Gemm"] if method == "dynamic" else [])
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".quantize-") as tmp:
        tmp_raw, tmp_in, tmp_out = Path(tmp) / "model.raw.onnx", Path(tmp) / "model.fp32.onnx", Path(tmp) / "model.int8.onnx"
        onnx.save(proto, str(tmp_raw))
        try:
            # onnxruntime's recommended pre-processing: shape inference and graph optimisation
            # (e.g. BatchNorm folded into Conv), so that quantised ops fuse.
            quant_pre_process(str(tmp_raw), str(tmp_in))
        except Exception as err:
            raise QuantizeError(f"onnxruntime could not pre-process {source} for quantisation: {err}") from err
        keep = _final_linear_nodes(onnx.load(str(tmp_in)))
        try:
            if method == "dynamic":
                quantize_dynamic(str(tmp_in), str(tmp_out), op_types_to_quantize=ops, per_channel=True,
                                 weight_type=QuantType.QInt8, nodes_to_exclude=keep)
            else:
                quantize_static(str(tmp_in), str(tmp_out), _Calibration(calibration or []), quant_format=QuantFormat.QDQ,
                                op_types_to_quantize=ops or None, per_channel=True, activation_type=QuantType.QUInt8,
                                weight_type=QuantType.QInt8, nodes_to_exclude=keep)
        except Exception as err:  # onnxruntime raises assorted types
            raise QuantizeError(f"onnxruntime could not quantise {source} ({method}): {err}. Try the other method or keep fp32") from err
        quantized = onnx.load(str(tmp_out))
        props[QUANT_KEY] = json.dumps({
            "method": method, "weights": "int8 per-channel", "ops": ops or "all supported", "kept_float": keep,
            "calibration_images": len(calibration or []) if method == "static" else 0, "source_sha256": _sha256(source),
        })
        onnx.helper.set_model_props(quantized, props)
        onnx.save(quantized, str(tmp_out))
        load_onnx_model(tmp_out)  # the result must still be a fedxray model
        os.replace(tmp_out, target)
    logger.info("wrote %s (%s, %.1f MB -> %.1f MB)", target, method, source.stat().st_size / 1e6, target.stat().st_size / 1e6)
    return target


class _Calibration(CalibrationDataReader):
    """Feeds calibration images one at a time to onnxruntime's static quantiser."""

    def __init__(self, images: list[np.ndarray]) -> None:
        self._items = iter([{INPUT_NAME: np.asarray(x, dtype=np.float32)} for x in images])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._items, None)


def _constants_to_initializers(proto: onnx.ModelProto, min_size: int = 16) -> None:
    """Move tensors of ``Constant`` nodes with at least ``min_size`` values into initializers (same graph)."""
    graph = proto.graph
    for node in list(graph.node):
        if node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value":
            array = numpy_helper.to_array(node.attribute[0].t)
            if array.size >= min_size:
                graph.initializer.append(numpy_helper.from_array(array, node.output[0]))
                graph.node.remove(node)


def _final_linear_nodes(proto: onnx.ModelProto) -> list[str]:
    """Names of the nodes from the feature map to the output, kept in float when the graph has a linear head.

    That is the linear layer, its Flatten and, for CNNs, the global pooling: then
    :func:`clinic.heatmap.find_linear_head` still recognises the head of the int8 graph. The
    quantiser rewrites a Gemm as ``<name>_MatMul`` + Add before it looks at the exclusions, so
    both names are listed.
    """
    if find_linear_head(proto) is None:
        return []
    producer = {out: node for node in proto.graph.node for out in node.output}
    link = producer[OUTPUT_NAME]  # sigmoid / softmax: quantised, the probabilities would have 1/255 steps
    names = [link.name]
    node = producer[link.input[0]]
    logits, _, _ = calibration_nodes(node, producer, _constants(proto))
    if logits is not node:  # the export's calibration Add(Mul(logits, a), b): two float scalars, kept
        names += [node.name, *(producer[i].name for i in node.input if i in producer)]
        node = logits
    names.append(node.name)
    if node.op_type == "Gemm":
        names.append(node.name + "_MatMul")
        features = node.input[0]
    else:  # Add(MatMul(x, W), b)
        matmul = next(producer[i] for i in node.input if i in producer and producer[i].op_type == "MatMul")
        names.append(matmul.name)
        features = matmul.input[0]
    flatten = producer[features]
    names.append(flatten.name)
    pool = producer.get(flatten.input[0])
    if pool is not None and pool.op_type in ("GlobalAveragePool", "ReduceMean"):
        names.append(pool.name)
    return [n for n in names if n]


def _constants(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    consts = {init.name: numpy_helper.to_array(init) for init in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            consts[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return consts


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
