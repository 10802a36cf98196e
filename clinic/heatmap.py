"""Where in the image the model found its evidence: attribution maps from the ONNX model alone.

A hospital has the exported ONNX graph, not the torch model, so every explanation here works on
the graph. Two methods, chosen per model when it is loaded:

* **Linear-head decomposition** (exact). Every fedxray model ends in one linear layer before the
  sigmoid/softmax. For ``scatternet`` that layer reads the normalised scattering coefficients
  ``F[k, i, j]`` directly (81 channels on a 16 x 16 grid at 64 px), so the logit is exactly
  ``b + sum_ij M[i, j]`` with ``M[i, j] = sum_k W[k, i, j] F[k, i, j]``: ``M`` is an exact
  decomposition of the logit over image positions, each cell covering a 2^J-pixel block of the
  model input. For DenseNet121 / MobileNetV2 the layer reads the global average of the last
  feature map ``A``, and ``M[i, j] = sum_k W[k] A[k, i, j] / (h w)`` is the Class Activation Map
  (Zhou et al., CVPR 2016), which for this architecture equals Grad-CAM on the last block. One
  forward pass gives the probability and the map (the feature tensor is added as a second
  output of the graph). The decomposition is checked against the model's own probabilities on
  two random images when the model is loaded; a graph it does not fit falls back to:
* **Occlusion sensitivity** (any model). Hide one patch at a time (replaced by a heavy blur of
  the image, so brightness stays plausible) and record how much the logit drops: 64 forward
  passes per image on an 8 x 8 grid.

Maps are in logit units: positive cells push towards the finding. The overlay shows the positive
part only, scaled to the image's own maximum: it says *where* the evidence is strongest in this
image, not *how strong* it is (the SR carries the probability). docs/clinic.md explains how to
read it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
from matplotlib import colormaps
from numpy.typing import NDArray
from onnx import numpy_helper
from PIL import Image, ImageDraw, ImageFont

from common.images import resize_image
from common.intended_use import OOD_OUTPUT
from common.onnx_export import INPUT_NAME, OUTPUT_NAME

logger = logging.getLogger(__name__)

OCCLUSION_GRID = 8  # patches per side for occlusion sensitivity (64 forward passes per image)
OVERLAY_MAX_SIDE = 1024  # long side of the overlay image (PNG and Secondary Capture), in pixels
_CHECK_TOLERANCE = 1e-4  # |probability - link(bias + sum of the map)| accepted when checking the decomposition


@dataclass(frozen=True)
class LinearHead:
    """The graph's last linear layer: ``logits = feature_reduce(T) @ weight.T + bias``.

    ``tensor`` is the name of the feature tensor [N, K, h, w] in the graph; ``pooled`` says
    whether a global average pool sits between it and the linear layer (CNNs) or not (the
    scattering features are flattened as they are).
    """

    tensor: str
    weight: NDArray[np.float32]  # [C, K] when pooled, [C, K*h*w] when not
    bias: NDArray[np.float32]  # [C]
    pooled: bool


class Explainer:
    """Probabilities and an attribution map per image, from one ONNX file.

    ``method`` is "linear-head" (exact, one pass) or "occlusion" (64 passes), decided once when
    the model is loaded ("none" with ``attribution=False``: probabilities only). ``session``
    computes the probabilities in every case, so the map and the score come from the same graph.
    """

    def __init__(self, model_bytes: bytes, task: str, *, threads: int | None = None, attribution: bool = True,
                 providers: list[str] | None = None) -> None:
        self.task = task
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        # No spin-waiting between calls: scoring alternates with Python work (decoding, overlays, DIMSE),
        # and spinning pool threads took the CPU from it (a 5 ms model measured 20 ms per image on 2 cores).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        proto = onnx.load_from_string(model_bytes)
        self.head = find_linear_head(proto) if attribution else None
        self.method = "occlusion" if attribution else "none"
        if self.head is not None:
            proto.graph.output.append(onnx.helper.make_tensor_value_info(self.head.tensor, onnx.TensorProto.FLOAT, None))
            model_bytes = proto.SerializeToString()
        self.session = ort.InferenceSession(model_bytes, sess_options=options, providers=providers or ["CPUExecutionProvider"])
        self.ood_output = OOD_OUTPUT in [o.name for o in self.session.get_outputs()]  # the intended-use image check
        if self.head is not None:
            error = self._check_decomposition()
            if error <= _CHECK_TOLERANCE:
                self.method = "linear-head"
            else:
                logger.warning("linear-head decomposition off by %.3g in probability on test images: using occlusion", error)
        logger.debug("attribution method: %s", self.method)

    def run(self, images: NDArray[np.float32]) -> tuple[NDArray[np.float32], NDArray[np.float32] | None]:
        """(probabilities [N, C], maps [N, C, h, w] or None with occlusion) for model inputs [N, 1, H, W]."""
        probs, maps, _ = self._run(images, ood=False)
        return probs, maps

    def run_with_ood(self, images: NDArray[np.float32]) -> tuple[NDArray[np.float32], NDArray[np.float32] | None,
                                                                   NDArray[np.float32] | None]:
        """As :meth:`run`, plus the image check's scores [N] from the same pass (None for a model without the check)."""
        return self._run(images, ood=self.ood_output)

    def _run(self, images: NDArray[np.float32], *, ood: bool) -> tuple[NDArray[np.float32], NDArray[np.float32] | None,
                                                                      NDArray[np.float32] | None]:
        names = [OUTPUT_NAME] if self.method != "linear-head" else [OUTPUT_NAME, self.head.tensor]  # type: ignore[union-attr]
        out = self.session.run([*names, OOD_OUTPUT] if ood else names, {INPUT_NAME: images})
        probs = np.asarray(out[0], dtype=np.float32)
        scores = np.asarray(out[-1], dtype=np.float32) if ood else None
        if self.method != "linear-head":
            return probs, None, scores
        return probs, self._maps(np.asarray(out[1], dtype=np.float32)), scores

    def explain(self, image: NDArray[np.float32], label_index: int) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
        """(probabilities [C], map [h, w] in logit units for ``label_index``) of one input [1, 1, H, W]."""
        probs, maps = self.run(image)
        if maps is not None:
            return probs[0], maps[0, label_index]
        return probs[0], self.occlusion(image, probs[0], label_index)

    # ------------------------------------------------------------------ methods

    def _maps(self, features: NDArray[np.float32]) -> NDArray[np.float32]:
        head = self.head
        assert head is not None  # only called for the linear-head method
        n, k, h, w = features.shape
        if head.pooled:
            return np.einsum("ck,nkhw->nchw", head.weight, features) / np.float32(h * w)
        weight = head.weight.reshape(head.weight.shape[0], k, h, w)
        return np.einsum("ckhw,nkhw->nchw", weight, features)

    def _check_decomposition(self) -> float:
        """Largest |model probability - link(bias + sum of the map)| over three test images.

        Compared in probability space: near 0 or 1 a float32 probability cannot be inverted to
        its logit precisely, but the forward direction is exact to rounding.
        """
        assert self.head is not None
        dims = self.session.get_inputs()[0].shape  # [batch, 1, H, W]; batch is a name (dynamic)
        shape = tuple(int(d) for d in dims[1:])
        rng = np.random.default_rng(0)
        ramp = np.broadcast_to(np.linspace(0.0, 1.0, shape[-1], dtype=np.float32), shape)
        images = np.stack([rng.random(shape, dtype=np.float32), np.full(shape, 0.5, np.float32), ramp]).astype(np.float32)
        try:
            probs, feats = self.session.run([OUTPUT_NAME, self.head.tensor], {INPUT_NAME: images})
            feats = np.asarray(feats, dtype=np.float32)
            if feats.ndim != 4:
                return float("inf")
            maps = self._maps(feats)
        except Exception as err:  # a tensor of another shape than expected: fall back
            logger.debug("decomposition check failed: %s", err)
            return float("inf")
        rebuilt = maps.sum(axis=(2, 3), dtype=np.float64) + self.head.bias
        if self.task == "multiclass":
            rebuilt = np.exp(rebuilt - rebuilt.max(axis=1, keepdims=True))
            rebuilt /= rebuilt.sum(axis=1, keepdims=True)
        else:
            rebuilt = 1.0 / (1.0 + np.exp(-rebuilt))
        return float(np.max(np.abs(rebuilt - np.asarray(probs, dtype=np.float64))))

    def occlusion(self, image: NDArray[np.float32], probs: NDArray[np.float32], label_index: int) -> NDArray[np.float32]:
        """Logit drop when each cell of an 8 x 8 grid is replaced by a blurred copy of the image."""
        _, _, height, width = image.shape
        grid = OCCLUSION_GRID
        blurred = resize_image(resize_image(image[0, 0], (grid // 2, grid // 2)), (height, width))
        rows = np.linspace(0, height, grid + 1).astype(int)
        cols = np.linspace(0, width, grid + 1).astype(int)
        batch = np.repeat(image, grid * grid, axis=0)
        for i in range(grid):
            for j in range(grid):
                cell = batch[i * grid + j, 0]
                cell[rows[i] : rows[i + 1], cols[j] : cols[j + 1]] = blurred[rows[i] : rows[i + 1], cols[j] : cols[j + 1]]
        occluded = np.concatenate([self.session.run([OUTPUT_NAME], {INPUT_NAME: batch[s : s + 16]})[0] for s in range(0, len(batch), 16)])
        base = _logits(probs[None].astype(np.float64), self.task)[0, label_index]
        hidden = _logits(occluded.astype(np.float64), self.task)[:, label_index]
        return np.nan_to_num(base - hidden).reshape(grid, grid).astype(np.float32)


def _logits(probs: NDArray[np.float64], task: str) -> NDArray[np.float64]:
    """Inverse of the output link: logit for sigmoid outputs, log-probability for softmax."""
    p = np.clip(probs, 1e-7, 1 - 1e-7)
    if task == "multiclass":
        return np.log(p)
    return np.log(p) - np.log1p(-p)


def find_linear_head(proto: onnx.ModelProto) -> LinearHead | None:
    """The last linear layer of a fedxray graph, or None when the graph has another shape.

    Recognised: ``probabilities = Sigmoid|Softmax(Gemm(Flatten(X), W, b))`` (or ``Add(MatMul(...), b)``)
    where X is either a feature map [N, K, h, w] or ``GlobalAveragePool`` / ``ReduceMean`` over the
    spatial axes of one.
    """
    graph = proto.graph
    producer = {out: node for node in graph.node for out in node.output}
    consts = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            consts[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    link = producer.get(OUTPUT_NAME)
    if link is None or link.op_type not in ("Sigmoid", "Softmax"):
        return None
    node, scale, shift = calibration_nodes(producer.get(link.input[0]), producer, consts)
    linear = _linear_layer(node, producer, consts)
    if linear is None:
        return None
    features, weight, bias = linear
    weight, bias = weight * np.float32(scale), bias * np.float32(scale) + np.float32(shift)
    flatten = producer.get(features)
    if flatten is None or flatten.op_type != "Flatten":
        return None
    source = producer.get(flatten.input[0])
    if source is not None and source.op_type == "GlobalAveragePool":
        return LinearHead(source.input[0], weight, bias, pooled=True)
    if source is not None and source.op_type == "ReduceMean":
        axes = {a.name: onnx.helper.get_attribute_value(a) for a in source.attribute}.get("axes")
        if axes is None and len(source.input) > 1 and source.input[1] in consts:
            axes = consts[source.input[1]].tolist()
        if axes is not None and sorted(int(a) % 4 for a in axes) == [2, 3]:
            return LinearHead(source.input[0], weight, bias, pooled=True)
        return None
    return LinearHead(flatten.input[0], weight, bias, pooled=False)


def _scalar(name: str, consts: dict[str, np.ndarray]) -> float | None:
    value = consts.get(name)
    return float(value.reshape(-1)[0]) if value is not None and value.size == 1 else None


def calibration_nodes(
    node: onnx.NodeProto | None, producer: dict[str, onnx.NodeProto], consts: dict[str, np.ndarray]
) -> tuple[onnx.NodeProto | None, float, float]:
    """Peel the export's calibration ``Add(Mul(logits, a), b)`` (common/calibration.py): (logit node, a, b).

    A calibrated logit is still linear in the features, so the exact map folds ``a`` and ``b`` into
    the head's weight and bias. A graph without the two scalar constants comes back unchanged (1, 0).
    """
    if node is None or node.op_type != "Add" or len(node.input) != 2:
        return node, 1.0, 0.0
    shifts = [_scalar(name, consts) for name in node.input]
    for i in (0, 1):
        mul = producer.get(node.input[1 - i])
        if shifts[i] is None or mul is None or mul.op_type != "Mul" or len(mul.input) != 2:
            continue
        for j in (0, 1):
            scale = _scalar(mul.input[j], consts)
            if scale is not None:
                return producer.get(mul.input[1 - j]), scale, float(shifts[i])
    return node, 1.0, 0.0


def _linear_layer(
    node: onnx.NodeProto | None, producer: dict[str, onnx.NodeProto], consts: dict[str, np.ndarray]
) -> tuple[str, NDArray[np.float32], NDArray[np.float32]] | None:
    """(input tensor, weight [C, K], bias [C]) of ``Gemm(x, W, b)`` or ``Add(MatMul(x, W), b)``.

    The second form is what onnxruntime's quantiser leaves of a Gemm it was told to keep in float.
    """
    if node is not None and node.op_type == "Gemm" and len(node.input) >= 2 and node.input[1] in consts:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("transA", 0):
            return None
        weight = np.asarray(consts[node.input[1]], dtype=np.float32) * np.float32(attrs.get("alpha", 1.0))
        weight = weight if attrs.get("transB", 0) else weight.T
        bias = np.zeros(weight.shape[0], dtype=np.float32)
        if len(node.input) > 2 and node.input[2]:
            if node.input[2] not in consts:
                return None
            bias = bias + np.asarray(consts[node.input[2]], dtype=np.float32).reshape(-1) * np.float32(attrs.get("beta", 1.0))
        return node.input[0], weight, bias
    if node is not None and node.op_type == "Add":
        matmul_in = [name for name in node.input if name not in consts]
        bias_in = [name for name in node.input if name in consts]
        matmul = producer.get(matmul_in[0]) if len(matmul_in) == 1 and len(bias_in) == 1 else None
        if matmul is not None and matmul.op_type == "MatMul" and matmul.input[1] in consts:
            weight = np.asarray(consts[matmul.input[1]], dtype=np.float32).T
            bias = np.zeros(weight.shape[0], dtype=np.float32) + np.asarray(consts[bias_in[0]], dtype=np.float32).reshape(-1)
            return matmul.input[0], weight, bias
    return None


# --------------------------------------------------------------------------- overlay


def overlay(pixels: NDArray[np.float32], attribution: NDArray[np.float32], caption: str) -> NDArray[np.uint8]:
    """RGB uint8 [H', W', 3]: the radiograph in grey with the positive evidence in colour, and a caption.

    ``pixels`` is the display image [H, W] in [0, 1] (load_pixels); ``attribution`` any [h, w]
    map, resized bilinearly over the whole image (as the model input was). The long side is at
    most :data:`OVERLAY_MAX_SIDE` pixels. The caption is burned in at the top (no patient
    identifiers: the caller passes the finding, probability and model only).
    """
    height, width = pixels.shape
    scale = min(1.0, OVERLAY_MAX_SIDE / max(height, width))
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    grey = resize_image(pixels, size)
    heat = heat_levels(attribution, size)
    colour = colormaps["jet"](heat)[..., :3].astype(np.float32)
    alpha = (0.55 * np.clip((heat - 0.15) / 0.85, 0.0, 1.0))[..., None]  # weak evidence stays grey
    rgb = (1.0 - alpha) * grey[..., None] + alpha * colour
    image = Image.fromarray(np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8), mode="RGB")
    _caption(image, caption)
    return np.asarray(image, dtype=np.uint8)


def heat_levels(attribution: NDArray[np.float32], size: tuple[int, int]) -> NDArray[np.float32]:
    """Positive part of ``attribution`` resized to ``size`` and scaled to [0, 1] by its maximum (0 when none)."""
    positive = np.clip(np.nan_to_num(np.asarray(attribution, dtype=np.float32)), 0.0, None)
    top = float(positive.max()) if positive.size else 0.0
    if top <= 0.0:
        return np.zeros(size, dtype=np.float32)
    return np.clip(resize_image(positive / top, size), 0.0, 1.0)


def _caption(image: Image.Image, text: str) -> None:
    """Burn ``text`` on a dark band at the top of ``image`` (readable at any size)."""
    draw = ImageDraw.Draw(image)
    size = max(10, image.width // 45)
    try:
        font = ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        font = ImageFont.load_default()
    box = draw.textbbox((0, 0), text, font=font)
    band = box[3] - box[1] + size // 2
    draw.rectangle((0, 0, image.width, band), fill=(0, 0, 0))
    draw.text((size // 3, size // 4 - box[1]), text, fill=(255, 255, 255), font=font)


def save_png(rgb: NDArray[np.uint8], path: str) -> None:
    """Write an RGB overlay as PNG."""
    Image.fromarray(rgb, mode="RGB").save(path, format="PNG", optimize=False)
