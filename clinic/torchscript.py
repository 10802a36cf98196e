"""``fl-predict --model model.pt``: the TorchScript twin of the ONNX model behind the Scorer's interface.

:func:`open_model` picks the runtime from the file's content (a TorchScript archive is a zip, an
ONNX model a protobuf), so every ``fl-predict`` command takes either file. Both classifiers
parse the same ``fedxray.*`` metadata, and both expose an onnxruntime-like ``session.run``.

Heatmaps: the exact linear-head decomposition of :mod:`clinic.heatmap` reads the ONNX graph
(it adds the feature tensor as a second output), which a traced TorchScript module does not
offer; with ``model.pt`` the map is occlusion sensitivity (64 forward passes per image, any
model). Use ``model.onnx`` where heatmaps matter (docs/clinic.md).
"""

from __future__ import annotations

import logging
import os

import torch

from clinic.heatmap import Explainer
from common.devices import onnx_providers
from common.onnx_export import OnnxClassifier, load_onnx_model
from common.torchscript_export import TorchScriptClassifier, is_torchscript, load_torchscript_model

logger = logging.getLogger(__name__)

def open_model(path: str | os.PathLike[str], *, threads: int | None = None,
               device: str = "cpu") -> OnnxClassifier | TorchScriptClassifier:
    """The fedxray model in ``path``, ONNX (fp32 or int8) or TorchScript; raises OnnxModelError (or its subclass).

    ``device`` (common/devices.py) picks onnxruntime's execution providers; ``model.pt`` is scored
    on the CPU (a ``cuda`` request says so once): the ONNX model is the one to run on a GPU.
    """
    if is_torchscript(path):
        if device == "cuda":
            logger.warning("fl-predict scores model.pt on the CPU; for a GPU use model.onnx with onnxruntime-gpu")
        if threads is not None:  # --threads: torch's intra-op threads are per process (fl-predict is one model per process)
            torch.set_num_threads(threads)
        return load_torchscript_model(path)
    return load_onnx_model(path, threads=threads, providers=onnx_providers(device))


class TorchScriptExplainer(Explainer):
    """:class:`~clinic.heatmap.Explainer` over a TorchScript model: probabilities, and occlusion maps."""

    def __init__(self, classifier: TorchScriptClassifier, task: str, *, attribution: bool = True) -> None:
        # Not Explainer.__init__: that one builds an onnxruntime session from ONNX bytes.
        self.task = task
        self.head = None
        self.method = "occlusion" if attribution else "none"
        self.session = classifier.session  # type: ignore[assignment]  # run(names, feeds) as onnxruntime's
        self.ood_output = classifier.session.has_ood()  # type: ignore[attr-defined]
