"""The chest X-ray classifiers, in one builder used everywhere.

Server, client and ONNX export all call :func:`build_model`, so the same arguments always give
the same architecture and the same ``state_dict`` keys.

* ``scatternet`` (the default, DP-first): a fixed scattering front end (common/scattering.py, no
  trainable parameters, costs no privacy), a data-independent per-sample GroupNorm (no affine
  parameters) and a small head, ``linear`` (logistic regression on the 81 x 16 x 16 scattering
  coefficients at 64 px: 20,737 parameters for one output) or ``cnn`` (two 3x3 convolutions
  with GroupNorm and tanh, about 42k parameters). Tramer & Boneh (ICLR 2021): under DP-SGD the
  noise per step grows with the number of trained parameters, and fixed features leave few to
  train; docs/models.md has the figures. Its state_dict holds the head only (``head.*``): that
  is all that travels between sites and coordinator. The sites train the head on cached
  features (:func:`split_features`); the whole model (front end included) is what is exported.
* ``densenet121`` and ``mobilenet_v2``: torchvision's architectures (keys ``features.*``,
  ``classifier.*``, so torchvision ImageNet weights load by name), for non-DP runs and for DP
  fine-tuning from local pretrained weights (``train_part`` freezes all but the head or the last
  block, so DP noise touches few parameters).

Two forms of each torchvision architecture:

* ``dp=True`` (the default, what federated training uses): DP-SGD needs a per-sample gradient
  for every parameter, which BatchNorm breaks (it mixes the samples of a batch), so every
  BatchNorm becomes a GroupNorm; and Opacus' backward hooks fail on in-place ops ("Output 0 of
  BackwardHookFunction is a view and is being modified inplace"), so every ReLU/ReLU6 is
  out-of-place and the forward is our own (torchvision's ``DenseNet.forward`` calls
  ``F.relu(..., inplace=True)``). The result passes ``ModuleValidator.validate(strict=True)``.
* ``dp=False``: the plain torchvision architecture (BatchNorm), for non-private baselines.

Both take ``[N, 1, H, W]`` float inputs in [0, 1] (what ``common.dicom.read_radiograph`` gives)
and normalise inside the model with plain Python floats (:data:`NORMALISATION`), so the
exported ONNX graph takes the same input and no normalisation buffer sits in the state_dict.
The output is raw logits ``[N, num_outputs]``.

Pretrained weights are never downloaded (the machines have no hub access): torchvision
builders always get ``weights=None``; a local file may be given with ``weights_path``.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from common.model_errors import ModelError as ModelError
from common.model_errors import WeightsError as WeightsError
from common.model_weights import _FIRST_CONV_KEY as _FIRST_CONV_KEY
from common.model_weights import _few as _few
from common.model_weights import _strip_wrapper_prefix as _strip_wrapper_prefix
from common.model_weights import load_weights as load_weights
from common.scatter_net import INTENSITIES as INTENSITIES
from common.scatter_net import ScatterFrontEnd as ScatterFrontEnd
from common.scatter_net import ScatterHead as ScatterHead
from common.scatter_net import ScatterNet as ScatterNet
from common.scatter_net import split_features as split_features
from common.scattering import ScatteringError

log = logging.getLogger(__name__)

MODEL_NAMES: tuple[str, ...] = ("scatternet", "densenet121", "mobilenet_v2")
TORCHVISION_NAMES: tuple[str, ...] = ("densenet121", "mobilenet_v2")
HEADS: tuple[str, ...] = ("linear", "cnn")  # scatternet heads
TRAIN_PARTS: tuple[str, ...] = ("all", "last-block", "head")  # what a torchvision model trains

# (mean, std) of a [0, 1] grey value: the means of torchvision's ImageNet channel means
# (0.485, 0.456, 0.406) and stds (0.229, 0.224, 0.225). A grey image copied to RGB and
# normalised per channel then feeds an RGB first conv almost exactly like this single-channel
# normalisation feeds the RGB-summed 1-channel conv, so ImageNet weights see familiar inputs.
NORMALISATION: tuple[float, float] = (0.449, 0.226)

# Opacus grad_sample_mode per model: the fastest on CPU in benchmarks/train_throughput.py
# (figures and runs in docs/models.md). Change only with new figures.
_GRAD_SAMPLE_MODE: dict[str, str] = {
    "scatternet": "hooks",
    "densenet121": "hooks",
    "mobilenet_v2": "hooks",
}
_MAX_GROUPS = 32  # GroupNorm paper's default (Wu & He, 2018)




class DPConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` in every respect (same parameters, keys, forward and ONNX export).

    It exists as a distinct type so that ``common.dp`` can give Opacus faster per-sample
    gradient and gradient-norm routines for the DP-ready models' convolutions without changing
    how Opacus treats any other ``nn.Conv2d`` in the process. Opacus' own routine computes a
    grouped (depthwise) convolution's per-sample gradient as if it were dense and keeps the
    diagonal: ~90x slower on MobileNetV2's last depthwise layers (docs/models.md).
    Without ``common.dp`` imported, Opacus still handles it (through functorch), only slower.
    """


class RadiographClassifier(nn.Module):
    """A torchvision backbone behind in-model normalisation, with an in-place-free forward.

    Holds torchvision's ``features`` and ``classifier`` modules under their own names, so the
    state_dict keys are exactly torchvision's. ``final_relu`` is DenseNet's ReLU after
    ``norm5`` (applied here out-of-place; torchvision applies it in place).
    """

    def __init__(
        self,
        features: nn.Module,
        classifier: nn.Module,
        *,
        final_relu: bool,
        mean: float,
        std: float,
    ) -> None:
        super().__init__()
        self.features = features
        self.classifier = classifier
        self.final_relu = final_relu
        # Plain floats, not buffers: they never travel in state_dicts and are constants in ONNX.
        self.mean = float(mean)
        self.std = float(std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[N, 1, H, W] in [0, 1] -> logits [N, num_outputs]."""
        if x.dim() != 4 or x.shape[1] != 1:
            raise ModelError(
                f"model input has shape {tuple(x.shape)}; expected [N, 1, H, W] grey images "
                "in [0, 1]: add the channel axis with x.unsqueeze(1)"
            )
        x = (x - self.mean) / self.std
        x = self.features(x)
        if self.final_relu:
            x = F.relu(x)
        x = F.adaptive_avg_pool2d(x, 1)
        x = torch.flatten(x, 1)
        return self.classifier(x)


def group_norm_groups(num_channels: int) -> int:
    """Number of GroupNorm groups for ``num_channels``: gcd(32, C).

    32 groups as in the GroupNorm paper wherever C allows it (every DenseNet121 layer and most
    MobileNetV2 ones); otherwise the largest power of two dividing C (16 -> 16, 24 -> 8,
    144 -> 16), the same rule as Opacus' ``ModuleValidator.fix``.
    """
    return math.gcd(_MAX_GROUPS, num_channels)




def build_model(
    name: str,
    *,
    num_outputs: int,
    dp: bool = True,
    weights_path: str | os.PathLike[str] | None = None,
    image_size: int = 64,
    scatter_j: int = 2,
    head: str = "linear",
    train_part: str = "all",
    intensity: str = "equalise",
    pool: int = 1,
    border: float = 0.0,
) -> nn.Module:
    """Build ``name`` for 1-channel [0, 1] inputs with ``num_outputs`` logits.

    Args:
        name: one of :data:`MODEL_NAMES`.
        num_outputs: logits per image (1 for a binary task, C for multiclass / multilabel).
        dp: torchvision models only: True for the DP-ready form (GroupNorm, no in-place ops);
            False for the plain torchvision form (BatchNorm). A ScatterNet is always DP-ready.
        weights_path: optional local weights: a state_dict of this architecture (as saved from
            a model built here, also with an Opacus ``_module.`` prefix) or torchvision ImageNet
            weights (the RGB first conv is summed to one channel; tensors that do not fit, such
            as BatchNorm running statistics or a 1000-class head, are skipped and logged).
        image_size, scatter_j, head, intensity: scatternet only: input side, scattering scale J,
            :data:`HEADS` member and the per-image intensity standardisation before the scattering
            (:data:`common.scatter_net.INTENSITIES`); ``pool``: the linear head reads the mean of
            pool x pool cells of the normalised coefficients (1: every cell); ``border``: cells in the
            outer share of the image on each side are read as 0 (0: none).
        train_part: torchvision models only, :data:`TRAIN_PARTS`: which parameters train
            (``requires_grad``); the rest stay as loaded (DP fine-tuning from pretrained weights).

    Raises:
        ModelError: unknown name, head or train part, or num_outputs < 1.
        WeightsError: the weights file is unreadable or nothing in it fits this architecture.
    """
    if name not in MODEL_NAMES:
        raise ModelError(f"unknown model {name!r}; expected one of {', '.join(MODEL_NAMES)}")
    if isinstance(num_outputs, bool) or not isinstance(num_outputs, int) or num_outputs < 1:
        raise ModelError(
            f"num_outputs={num_outputs!r} for model {name!r}; expected an int >= 1 "
            "(1 for a binary task, the number of classes or findings otherwise)"
        )
    if head not in HEADS:
        raise ModelError(f"unknown scatternet head {head!r}; expected one of {', '.join(HEADS)}")
    if train_part not in TRAIN_PARTS:
        raise ModelError(f"unknown train part {train_part!r}; expected one of {', '.join(TRAIN_PARTS)}")
    model: nn.Module
    if name == "scatternet":
        try:
            model = ScatterNet(image_size=image_size, num_outputs=num_outputs, J=scatter_j, head=head,
                               intensity=intensity, pool=pool, border=border)
        except ScatteringError as err:
            raise ModelError(str(err)) from err
    else:
        # Deferred: torchvision costs 0.5-0.7 s to import, and a deployed site starts a new process for
        # every Flower message; the default ScatterNet never needs it.
        from torchvision import models as tvm

        mean, std = NORMALISATION
        if name == "densenet121":
            net = tvm.densenet121(weights=None, num_classes=num_outputs)
            net.features.conv0 = _one_channel(net.features.conv0)
            model = RadiographClassifier(net.features, net.classifier, final_relu=True, mean=mean, std=std)
        else:
            net = tvm.mobilenet_v2(weights=None, num_classes=num_outputs)
            net.features[0][0] = _one_channel(net.features[0][0])
            model = RadiographClassifier(net.features, net.classifier, final_relu=False, mean=mean, std=std)
        if dp:
            _to_dp_ready(model)
    if weights_path is not None:
        load_weights(model, name, weights_path)
    if name != "scatternet":
        freeze_to(model, train_part)
    return model


def freeze_to(model: nn.Module, train_part: str) -> None:
    """Let only ``train_part`` of a torchvision model train: all, the last feature block + head, or the head.

    Frozen layers need no per-sample gradients, so DP fine-tuning of the head of a pretrained
    DenseNet121 clips and noises about 1k parameters per output instead of 7M.
    """
    if train_part == "all":
        return
    features = getattr(model, "features", None)
    keep = [model.classifier] if hasattr(model, "classifier") else []
    if train_part == "last-block" and isinstance(features, nn.Sequential):
        blocks = [m for m in features.children() if any(True for _ in m.parameters())]
        keep += blocks[-2:] if isinstance(blocks[-1], nn.GroupNorm | nn.BatchNorm2d) else blocks[-1:]
    for p in model.parameters():
        p.requires_grad_(False)
    for module in keep:
        for p in module.parameters():
            p.requires_grad_(True)


def _conv_like(conv: nn.Conv2d, cls: type[nn.Conv2d], in_channels: int) -> nn.Conv2d:
    """A new convolution of class ``cls`` with ``conv``'s geometry and ``in_channels`` inputs."""
    return cls(
        in_channels,
        conv.out_channels,
        kernel_size=conv.kernel_size,  # type: ignore[arg-type]
        stride=conv.stride,  # type: ignore[arg-type]
        padding=conv.padding,  # type: ignore[arg-type]
        dilation=conv.dilation,  # type: ignore[arg-type]
        groups=conv.groups,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
    )


def _one_channel(conv: nn.Conv2d) -> nn.Conv2d:
    """The same convolution with one input channel (grey radiographs)."""
    return _conv_like(conv, nn.Conv2d, 1)


def _to_dp_ready(model: nn.Module) -> None:
    """In place: BatchNorm -> GroupNorm, Conv2d -> DPConv2d, every activation out-of-place."""
    _replace_modules(
        model,
        lambda m: isinstance(m, nn.modules.batchnorm._BatchNorm),
        lambda m: nn.GroupNorm(group_norm_groups(m.num_features), m.num_features, affine=True),
    )
    _replace_modules(
        model, lambda m: type(m) is nn.Conv2d, lambda m: _as_dp_conv(cast(nn.Conv2d, m))
    )
    for module in model.modules():
        if hasattr(module, "inplace"):
            module.inplace = False


def _as_dp_conv(conv: nn.Conv2d) -> DPConv2d:
    """The same convolution, weights included, as a :class:`DPConv2d`."""
    new = cast(DPConv2d, _conv_like(conv, DPConv2d, conv.in_channels))
    new.load_state_dict(conv.state_dict())
    return new


def _replace_modules(
    root: nn.Module,
    match: Callable[[nn.Module], bool],
    make: Callable[[nn.Module], nn.Module],
) -> None:
    for child_name, child in root.named_children():
        if match(child):
            setattr(root, child_name, make(child))
        else:
            _replace_modules(child, match, make)




def grad_sample_mode(name: str, train_part: str = "all") -> str:
    """The Opacus ``grad_sample_mode`` fastest for ``name`` on CPU (see docs/models.md).

    A CNN fine-tuned in part (``train_part`` last-block or head: DP fine-tuning from a site's own
    weights) takes ghost clipping: it computes per-sample gradient norms without storing the
    per-sample gradients, and with most of the network frozen that is 15-30% faster than the hooks
    (benchmarks/train_throughput.py --train-part last-block: MobileNetV2 1.00-1.10x plain against
    0.77-0.88x with hooks, DenseNet121 0.71-0.72x against 0.59-0.62x, 64 px)."""
    if name not in _GRAD_SAMPLE_MODE:
        raise ModelError(f"unknown model {name!r}; expected one of {', '.join(MODEL_NAMES)}")
    if name in TORCHVISION_NAMES and train_part != "all":
        return "ghost"
    return _GRAD_SAMPLE_MODE[name]


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters (what DP-SGD clips and noises)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def describe(name: str, *, num_outputs: int = 1, **kwargs: object) -> dict[str, object]:
    """A small self-description of the model as federated training builds it, for model cards and logs."""
    model = build_model(name, num_outputs=num_outputs, dp=True, **kwargs)  # type: ignore[arg-type]
    info: dict[str, object] = {
        "name": name,
        "parameters": count_parameters(model),
        "num_outputs": num_outputs,
        "input": "[N, 1, H, W] float32 in [0, 1]",
        "grad_sample_mode": grad_sample_mode(name, str(kwargs.get("train_part", "all"))),
    }
    if isinstance(model, ScatterNet):
        sc = model.scattering
        info["architecture"] = (
            f"fixed front end ({'per-image histogram equalisation, ' if model.frontend.standardise is not None else ''}"
            f"scattering J={sc.J}, L={sc.L}, {sc.out_channels}x{sc.out_size[0]}x{sc.out_size[1]} "
            f"coefficients at {model.image_size} px, no trainable parameters) + GroupNorm({model.head.norm.num_groups}, "
            f"no affine) + {model.head.kind} head"
            + (f" on the mean of {model.head.pool}x{model.head.pool} cells" if model.head.pool > 1 else "")
            + (f", outer {model.head.border:.0%} of the image ignored" if model.head.mask is not None else "")
            + f", {num_outputs} logits"
        )
        info["dp_form"] = "only the head trains; the front end is data-independent and costs no privacy"
        return info
    mean, std = NORMALISATION
    trainable = count_parameters(model)
    info["architecture"] = f"torchvision {name}, 1-channel first conv, {num_outputs} logits"
    info["normalisation"] = {"mean": mean, "std": std}
    info["dp_form"] = "BatchNorm -> GroupNorm(gcd(32, C) groups), no in-place ops"
    info["total_parameters"] = sum(p.numel() for p in model.parameters())
    info["parameters"] = trainable
    return info
