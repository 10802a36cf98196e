"""The ScatterNet: a fixed front end (intensity standardisation + scattering) and a small trained head.

Moved out of common/models.py (which re-exports every name; :func:`common.models.build_model`
builds it as ``scatternet``). Its state_dict holds the head only (``head.*``), and the sites train
the head on cached features (:func:`split_features`). The front end (:class:`ScatterFrontEnd`) is
every fixed, parameter-free transform of the image: per-image histogram equalisation
(common/equalise.py; ``intensity``) and the scattering transform (common/scattering.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from common.equalise import LEVELS, HistogramEqualisation
from common.model_errors import ModelError
from common.scattering import Scattering2D, group_count

#: Per-image intensity standardisation before the scattering: ``equalise`` (histogram equalisation,
#: the default: acquisition curves do not reach the features) or ``none`` (the images as read).
INTENSITIES: tuple[str, ...] = ("equalise", "none")


def border_mask(grid: tuple[int, int], border: float) -> torch.Tensor:
    """bool [h, w]: True for the cells whose centre lies inside the image less its outer ``border`` share per side."""
    rows = (torch.arange(grid[0]) + 0.5) / grid[0]
    cols = (torch.arange(grid[1]) + 0.5) / grid[1]
    inside_rows = (rows >= border) & (rows <= 1.0 - border)
    inside_cols = (cols >= border) & (cols <= 1.0 - border)
    return inside_rows[:, None] & inside_cols[None, :]


class ScatterHead(nn.Module):
    """What a ScatterNet trains: per-sample GroupNorm of the scattering coefficients, then a head.

    The GroupNorm has no affine parameters: it normalises each image's coefficients by groups of
    channels with that image's own statistics, so it needs no data set statistics (which would
    cost privacy) and behaves the same in training, evaluation and export.
    """

    def __init__(self, channels: int, size: tuple[int, int], num_outputs: int, kind: str, pool: int = 1,
                 border: float = 0.0) -> None:
        super().__init__()
        self.kind = kind
        self.pool = int(pool)  # linear head: mean of pool x pool cells of the normalised coefficients (1: none)
        self.border = float(border)
        self.norm = nn.GroupNorm(group_count(channels), channels, affine=False)
        grid = (size[0] // self.pool, size[1] // self.pool)
        # Cells whose centre lies in the outer `border` share of the image on any side are read as 0 (a plain
        # float mask, rebuilt from the settings: never in a state_dict); None when nothing is masked.
        keep = border_mask(grid, self.border)
        self.register_buffer("mask", None if bool(keep.all()) else keep.to(torch.float32), persistent=False)
        if kind == "linear":
            self.conv = None
            self.classifier = nn.Linear(channels * (size[0] // self.pool) * (size[1] // self.pool), num_outputs)
            # Logistic regression from zero: every site and seed starts at p = 0.5 exactly.
            nn.init.zeros_(self.classifier.weight)
            nn.init.zeros_(self.classifier.bias)
        else:
            self.conv = nn.Sequential(
                nn.Conv2d(channels, 32, 3, padding=1), nn.GroupNorm(8, 32), nn.Tanh(), nn.MaxPool2d(2),
                nn.Conv2d(32, 64, 3, padding=1), nn.GroupNorm(8, 64), nn.Tanh(), nn.MaxPool2d(2),
            )
            self.classifier = nn.Linear(64, num_outputs)

    def linear_parts(self):  # -> tuple[Callable[[Tensor], tuple[Tensor, Tensor]], nn.Linear] | None
        """(the fixed, parameter-free map before the classifier, the classifier) for the linear head, else None:
        what lets DP-SGD compute its per-sample gradients in closed form (common.dp_linear)."""
        return (self.normed, self.classifier) if self.conv is None else None

    def normed(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(GroupNorm output, its squared L2 norm per sample), the norm from the GroupNorm's own statistics.

        Each group of n values is scaled to variance var/(var+eps), so its squared norm is n (1 - eps rstd^2):
        no second pass over the features (common.dp_linear needs these norms for clipping).
        """
        n, c = features.shape[:2]
        groups, eps = self.norm.num_groups, self.norm.eps
        out, _, rstd = torch.native_group_norm(features, None, None, n, c, features[0, 0].numel(), groups, eps)
        if self.pool > 1 or self.mask is not None:
            out = self._read_out(out)
            return out, out.flatten(1).square().sum(dim=1)
        per_group = (c // groups) * features[0, 0].numel()
        return out, (1.0 - eps * rstd.square()).sum(dim=1) * per_group

    def _read_out(self, x: torch.Tensor) -> torch.Tensor:
        """The normalised coefficients as the classifier reads them: pooled over pool x pool cells, borders masked."""
        if self.pool > 1:
            x = F.avg_pool2d(x, self.pool)
        return x if self.mask is None else x * self.mask

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Scattering coefficients [N, K, h, w] -> logits [N, num_outputs]."""
        x = self._read_out(self.norm(features))
        if self.conv is not None:
            x = F.adaptive_avg_pool2d(self.conv(x), 1)
        return self.classifier(torch.flatten(x, 1))


class ScatterFrontEnd(nn.Module):
    """Everything fixed before the head: [N, 1, S, S] images in [0, 1] -> scattering coefficients [N, K, h, w].

    No parameters, no data-set statistics: the site computes it once per image and caches the result
    under :meth:`cache_spec` (common/loaders.py); the exported graph runs it on every image.
    """

    def __init__(self, image_size: int, J: int, L: int, intensity: str) -> None:
        super().__init__()
        if intensity not in INTENSITIES:
            raise ModelError(f"unknown scatternet intensity {intensity!r}; expected one of {', '.join(INTENSITIES)}")
        self.intensity = intensity
        self.standardise = HistogramEqualisation() if intensity == "equalise" else None
        self.scattering = Scattering2D(J, (image_size, image_size), L)

    def cache_spec(self, image_size: int) -> str:
        """Names these features in the site cache: a change of any setting is a different entry."""
        spec = self.scattering.cache_spec(image_size)
        return spec if self.standardise is None else f"eq{LEVELS}-{spec}"

    @property
    def out_channels(self) -> int:
        return self.scattering.out_channels

    @property
    def out_size(self) -> tuple[int, int]:
        return self.scattering.out_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.standardise is not None:
            x = self.standardise(x)
        return self.scattering(x)


class ScatterNet(nn.Module):
    """:class:`ScatterFrontEnd` + :class:`ScatterHead`: images [N, 1, S, S] in [0, 1] -> logits.

    The front end is built for one image size (its filters are defined on the padded grid), so
    ``image_size`` is part of the architecture, like ``J``, the intensity standardisation and the head.
    """

    def __init__(self, *, image_size: int, num_outputs: int, J: int = 2, L: int = 8, head: str = "linear",
                 intensity: str = "equalise", pool: int = 1, border: float = 0.0) -> None:
        super().__init__()
        self.image_size = int(image_size)
        self.frontend = ScatterFrontEnd(self.image_size, J, L, intensity)
        self.head = ScatterHead(self.frontend.out_channels, self.frontend.out_size, num_outputs, head,
                                pool if head == "linear" else 1, border if head == "linear" else 0.0)

    @property
    def scattering(self) -> Scattering2D:
        """The scattering transform of the front end (its J, L, output shape)."""
        return self.frontend.scattering

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Images [N, 1, S, S] -> front-end output [N, K, h, w] (what the site caches)."""
        if torch.jit.is_tracing():  # exporting: the shape is fixed by the example input
            return self.frontend(x)
        if x.dim() != 4 or x.shape[1] != 1 or tuple(x.shape[2:]) != (self.image_size, self.image_size):
            raise ModelError(
                f"model input has shape {tuple(x.shape)}; expected [N, 1, {self.image_size}, {self.image_size}] "
                f"grey images in [0, 1] resized to the model's image size"
            )
        return self.frontend(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def split_features(model: nn.Module) -> tuple[nn.Module | None, nn.Module, str]:
    """(fixed front end or None, trainable module, state_dict prefix of the trainable module).

    For a ScatterNet the front end is every fixed transform of the image (intensity standardisation
    and scattering, :class:`ScatterFrontEnd`): the sites compute it once per image and train the head
    on the cached features; its weights travel under ``head.``. Other models train whole.
    """
    if isinstance(model, ScatterNet):
        return model.frontend, model.head, "head."
    return None, model, ""
