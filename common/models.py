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
import pickle
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import models as tvm

from common.scattering import Scattering2D, ScatteringError, group_count

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

# Key of the first convolution's weight (the one that takes the image) per architecture.
_FIRST_CONV_KEY: dict[str, str] = {
    "densenet121": "features.conv0.weight",
    "mobilenet_v2": "features.0.0.weight",
}

_MAX_GROUPS = 32  # GroupNorm paper's default (Wu & He, 2018)


class ModelError(ValueError):
    """A model was asked for with an unknown name or bad arguments."""


class WeightsError(ValueError):
    """A weights file could not be read or does not fit the requested architecture."""


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


class ScatterHead(nn.Module):
    """What a ScatterNet trains: per-sample GroupNorm of the scattering coefficients, then a head.

    The GroupNorm has no affine parameters: it normalises each image's coefficients by groups of
    channels with that image's own statistics, so it needs no data set statistics (which would
    cost privacy) and behaves the same in training, evaluation and export.
    """

    def __init__(self, channels: int, size: tuple[int, int], num_outputs: int, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.norm = nn.GroupNorm(group_count(channels), channels, affine=False)
        if kind == "linear":
            self.conv = None
            self.classifier = nn.Linear(channels * size[0] * size[1], num_outputs)
            # Logistic regression from zero: every site and seed starts at p = 0.5 exactly.
            nn.init.zeros_(self.classifier.weight)
            nn.init.zeros_(self.classifier.bias)
        else:
            self.conv = nn.Sequential(
                nn.Conv2d(channels, 32, 3, padding=1), nn.GroupNorm(8, 32), nn.Tanh(), nn.MaxPool2d(2),
                nn.Conv2d(32, 64, 3, padding=1), nn.GroupNorm(8, 64), nn.Tanh(), nn.MaxPool2d(2),
            )
            self.classifier = nn.Linear(64, num_outputs)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Scattering coefficients [N, K, h, w] -> logits [N, num_outputs]."""
        x = self.norm(features)
        if self.conv is not None:
            x = F.adaptive_avg_pool2d(self.conv(x), 1)
        return self.classifier(torch.flatten(x, 1))


class ScatterNet(nn.Module):
    """Fixed scattering front end + :class:`ScatterHead`: images [N, 1, S, S] in [0, 1] -> logits.

    The front end is built for one image size (its filters are defined on the padded grid), so
    ``image_size`` is part of the architecture, like ``J`` and the head.
    """

    def __init__(self, *, image_size: int, num_outputs: int, J: int = 2, L: int = 8, head: str = "linear") -> None:
        super().__init__()
        self.image_size = int(image_size)
        self.scattering = Scattering2D(J, (self.image_size, self.image_size), L)
        self.head = ScatterHead(self.scattering.out_channels, self.scattering.out_size, num_outputs, head)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Images [N, 1, S, S] -> scattering coefficients [N, K, h, w] (what the site caches)."""
        if torch.jit.is_tracing():  # exporting: the shape is fixed by the example input
            return self.scattering(x)
        if x.dim() != 4 or x.shape[1] != 1 or tuple(x.shape[2:]) != (self.image_size, self.image_size):
            raise ModelError(
                f"model input has shape {tuple(x.shape)}; expected [N, 1, {self.image_size}, {self.image_size}] "
                f"grey images in [0, 1] resized to the model's image size"
            )
        return self.scattering(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def split_features(model: nn.Module) -> tuple[nn.Module | None, nn.Module, str]:
    """(fixed front end or None, trainable module, state_dict prefix of the trainable module).

    For a ScatterNet the sites compute the front end once per image and train the head on the
    cached features; its weights travel under ``head.``. Other models train whole.
    """
    if isinstance(model, ScatterNet):
        return model.scattering, model.head, "head."
    return None, model, ""


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
        image_size, scatter_j, head: scatternet only: input side, scattering scale J and
            :data:`HEADS` member.
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
            model = ScatterNet(image_size=image_size, num_outputs=num_outputs, J=scatter_j, head=head)
        except ScatteringError as err:
            raise ModelError(str(err)) from err
    else:
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


def load_weights(model: nn.Module, name: str, weights_path: str | os.PathLike[str]) -> None:
    """Load what fits from a local weights file into ``model`` (built by :func:`build_model`).

    Tensors are matched by key and shape; a 3-channel first conv is summed over its input
    channels. Everything skipped is logged in one line. Never downloads anything.
    """
    path = Path(weights_path)
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, EOFError, RuntimeError, ValueError, pickle.UnpicklingError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise WeightsError(
            f"cannot read weights file {path} for model {name!r}: {reason}; expected a "
            "torch.save'd state_dict of tensors (arbitrary pickles are never loaded)"
        ) from err
    if isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping):
        raise WeightsError(
            f"weights file {path} holds a {type(loaded).__name__}, expected a state_dict "
            f"(dict of name -> tensor) for model {name!r}"
        )
    source = {_strip_wrapper_prefix(str(k)): v for k, v in loaded.items()}
    target = model.state_dict()
    first_conv = _FIRST_CONV_KEY.get(name, "")

    fitting: dict[str, torch.Tensor] = {}
    skipped: list[str] = []
    for key, tensor in source.items():
        if not isinstance(tensor, torch.Tensor) or key not in target:
            skipped.append(key)
            continue
        want = target[key].shape
        if key == first_conv and tensor.dim() == 4 and tensor.shape[1] == 3 and want[1] == 1:
            tensor = tensor.sum(dim=1, keepdim=True)  # RGB filters -> one grey filter
        if tensor.shape != want:
            skipped.append(f"{key} {tuple(tensor.shape)}!={tuple(want)}")
            continue
        fitting[key] = tensor
    if not fitting:
        raise WeightsError(
            f"nothing in weights file {path} fits model {name!r} "
            f"(first keys there: {', '.join(list(source)[:3]) or 'none'}); expected a "
            f"state_dict of {name} as built by common.models.build_model or torchvision"
        )
    missing = [k for k in target if k not in fitting]
    model.load_state_dict(fitting, strict=False)
    if skipped or missing:
        log.warning(
            "weights %s -> %s: loaded %d of %d tensors; skipped %d from the file (%s); "
            "left at initial values %d (%s)",
            path.name, name, len(fitting), len(target), len(skipped), _few(skipped),
            len(missing), _few(missing),
        )
    else:
        log.info("weights %s -> %s: loaded all %d tensors", path.name, name, len(fitting))


def _strip_wrapper_prefix(key: str) -> str:
    """Drop Opacus' ``_module.`` and DDP's ``module.`` prefixes."""
    for prefix in ("_module.", "module."):
        while key.startswith(prefix):
            key = key[len(prefix):]
    return key


def _few(keys: list[str], limit: int = 4) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... {len(keys) - limit} more" if len(keys) > limit else "") or "none"


def grad_sample_mode(name: str) -> str:
    """The Opacus ``grad_sample_mode`` fastest for ``name`` on CPU (see docs/models.md)."""
    if name not in _GRAD_SAMPLE_MODE:
        raise ModelError(f"unknown model {name!r}; expected one of {', '.join(MODEL_NAMES)}")
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
        "grad_sample_mode": grad_sample_mode(name),
    }
    if isinstance(model, ScatterNet):
        sc = model.scattering
        info["architecture"] = (
            f"fixed scattering front end (J={sc.J}, L={sc.L}, {sc.out_channels}x{sc.out_size[0]}x{sc.out_size[1]} "
            f"coefficients at {model.image_size} px, no trainable parameters) + GroupNorm({model.head.norm.num_groups}, "
            f"no affine) + {model.head.kind} head, {num_outputs} logits"
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
