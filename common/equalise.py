"""Per-image histogram equalisation inside the model graph: the ScatterNet's intensity standardisation.

Hospitals differ most in how they map X-ray exposure to grey values: window and level, VOI LUT
curves, gamma, detector gain, bit depth. Each is (close to) a monotone map of the grey values, and
a monotone map does not change the rank of a pixel among the pixels of its own image. Replacing
every pixel by its mid-rank (the share of the image's pixels darker than it, plus half of those
exactly as bright) therefore gives the same image after any of those maps: the scattering and the
head downstream never see the acquisition's grey-value curve. Equalisation was the first half of
the largest gain measured on an external Kermany test set (docs/models.md).

It is part of the exported graph, not of the data path, so training at the site, the ONNX /
TorchScript export and ``fl-predict`` in the clinic apply the same one: the model's input stays
what it was (a grey image in [0, 1] resized to the model's size). The module has no parameters and no
data-set statistics (each image is equalised with its own histogram), so it costs no privacy and
belongs to the fixed front end (``common.models.split_features``).

How it is computed: grey values are binned into 256 levels (the site cache stores uint8 display
values, so cached images fall exactly on levels; float inputs in the clinic are binned the same
way, by comparison with the 255 level boundaries ``(b - 1/2) / 255``). From the number of the image's
pixels at or above each boundary follow the share below it and the mid-rank of every level (the
mean of the shares at its two boundaries); each pixel takes the mid-rank of its level. Eagerly (at
the site, where every image is transformed) the level and the counts come from ``bucketize`` and a
histogram; in a trace (ONNX and TorchScript export) from the comparisons themselves
(GreaterOrEqual, ReduceSum, Pad, GatherElements in ONNX), with the same comparisons and the same
integer counts, so both give the same float32 result bit for bit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: Grey levels the equaliser bins into (the site cache's uint8 display values).
LEVELS = 256


class HistogramEqualisation(nn.Module):
    """[N, 1, H, W] (or [N, H, W]) grey images in [0, 1] -> each image's mid-rank equalised copy, same shape.

    The output of every image is spread over [0, 1] with mean 1/2 whatever its grey-value curve: an
    image and any increasing map of its levels (gamma, window, gain) give the same output, up to
    levels merged by the map. A constant image becomes 1/2 everywhere.
    """

    def __init__(self, levels: int = LEVELS) -> None:
        super().__init__()
        if levels < 2:
            raise ValueError(f"histogram equalisation needs at least 2 grey levels, got {levels}")
        self.levels = int(levels)
        bounds = (torch.arange(1, levels, dtype=torch.float32) - 0.5) / (levels - 1)
        self.register_buffer("bounds", bounds, persistent=False)  # rebuilt from `levels`: never in a state_dict

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(1)  # [N, P]
        pixels = flat.shape[1]  # fixed by the model's input size (a constant in a trace)
        if torch.jit.is_tracing():  # exporting: comparisons only (no bucketize / scatter in ONNX)
            above = (flat.unsqueeze(-1) >= self.bounds).to(x.dtype)  # [N, P, L-1]
            level = above.sum(dim=-1).to(torch.int64)  # [N, P]: boundaries at or below the pixel
            n_above = above.sum(dim=1)  # [N, L-1]: pixels at or above each boundary
        else:
            level = torch.bucketize(flat, self.bounds, right=True)  # the same count, bound <= x
            counts = torch.zeros(flat.shape[0], self.levels, dtype=x.dtype, device=x.device)
            counts.scatter_add_(1, level, torch.ones_like(flat))
            n_above = pixels - counts.cumsum(dim=1)[:, :-1]  # exact integers, as the sums above
        below = (pixels - n_above) / pixels  # [N, L-1]: share of the image's pixels below boundary b
        cumulative = F.pad(F.pad(below, (1, 0), value=0.0), (0, 1), value=1.0)  # [N, L+1]: 0, below..., 1
        mid_rank = 0.5 * (cumulative[:, :-1] + cumulative[:, 1:])  # [N, L]: the mid-rank of each level
        return mid_rank.gather(1, level).view_as(x)

    def extra_repr(self) -> str:
        return f"levels={self.levels}"
