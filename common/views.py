"""Augmented views of each training image, for augmentation multiplicity under DP (De et al., 2022).

A hospital's model meets images from scanners, exposures and positioning that no site trained on.
Showing it several renderings of each training image teaches it what to ignore. Under DP-SGD
the views must not cost privacy: they are averaged into one per-sample gradient *before* it is
clipped (common/dp_linear.py), so one image still moves the sum by at most the clipping bound,
and Poisson sampling, the noise and the ledger are exactly those of training without views.

View 0 is the image itself; views 1..K-1 are acquisition-style renderings of it, each a pure
function of the image's content hash and the view index (a cached view is the same in every
round and run; no randomness is shared between images):

* positioning: rotation within +-8 degrees and a crop keeping 85-100% of the side, resized back;
* focus: a Gaussian blur of sigma 0.5-2 px (at 64 px; scaled with the image) for half the views;
* exposure and processing: gamma 0.6-1.6 and contrast 0.7-1.3 about the image's mean.

The recipe is the one measured on an external Kermany test set (docs/models.md); it is fixed
here, not chosen on the shift benchmark. No flips (a chest has a left and a right; common/augment.py).
Exposure changes are mostly undone by the model's own histogram equalisation; positioning and focus
are what the views add.

Views are rendered from the site's cached uint8 image at the run's size, then the fixed front end
turns them into features once; they are kept in the site cache as one float16 pack per training
split (common/cache.py ``views`` packs), about 41 KB per view per image at 64 px.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

#: Names the rendering recipe below in the site cache: change it whenever the recipe changes.
VIEW_RECIPE = "acq1"
ROTATION_DEGREES = 8.0
CROP_SIDE = (0.85, 1.0)
BLUR_SIGMA_64PX = (0.5, 2.0)
BLUR_PROBABILITY = 0.5
GAMMA = (0.6, 1.6)
CONTRAST = (0.7, 1.3)


def view_seed(content_hash: str, view: int) -> np.random.SeedSequence:
    """The randomness of one view of one image: its content hash and the view index, nothing else."""
    return np.random.SeedSequence([int(content_hash[:16], 16), int(view)])


def render_views(images: np.ndarray, keys: Sequence[str], views: int) -> np.ndarray:
    """Views 1..views-1 of uint8 images [N, S, S]: float32 [N, views-1, S, S] in [0, 1].

    ``keys`` are the images' content hashes (they seed each view). View 0, the image itself, is
    not returned: its features are the site's plain cached features.
    """
    n, size = images.shape[0], images.shape[-1]
    out = np.empty((n, max(0, views - 1), size, size), np.float32)
    if n == 0 or views <= 1:
        return out
    base = torch.from_numpy(np.ascontiguousarray(images)).to(torch.float32).div_(255.0).unsqueeze(1)  # [N, 1, S, S]
    for v in range(1, views):
        params = [_draw(view_seed(k, v), size) for k in keys]
        out[:, v - 1] = _apply(base, params).squeeze(1).numpy()
    return out


def _draw(seed: np.random.SeedSequence, size: int) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    side = rng.uniform(*CROP_SIDE)
    blur = rng.uniform(*BLUR_SIGMA_64PX) * size / 64.0 if rng.random() < BLUR_PROBABILITY else 0.0
    return {"angle": math.radians(rng.uniform(-ROTATION_DEGREES, ROTATION_DEGREES)), "side": side,
            "tx": rng.uniform(-1.0, 1.0) * (1.0 - side), "ty": rng.uniform(-1.0, 1.0) * (1.0 - side),
            "blur": blur, "gamma": rng.uniform(*GAMMA), "contrast": rng.uniform(*CONTRAST)}


def _apply(x: torch.Tensor, params: list[dict[str, float]]) -> torch.Tensor:
    """Positioning, focus, exposure, in that order (as acquisition produces them), on [N, 1, S, S]."""
    theta = torch.tensor([[[p["side"] * math.cos(p["angle"]), -p["side"] * math.sin(p["angle"]), p["tx"]],
                           [p["side"] * math.sin(p["angle"]), p["side"] * math.cos(p["angle"]), p["ty"]]]
                          for p in params], dtype=torch.float32)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    x = gaussian_blur(x, torch.tensor([p["blur"] for p in params], dtype=torch.float32))
    x = x.clamp(0.0, 1.0) ** torch.tensor([p["gamma"] for p in params]).view(-1, 1, 1, 1)
    mean = x.mean(dim=(2, 3), keepdim=True)
    return (mean + torch.tensor([p["contrast"] for p in params]).view(-1, 1, 1, 1) * (x - mean)).clamp(0.0, 1.0)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Each image of [N, 1, S, S] blurred with its own Gaussian (sigma [N] in pixels; 0 leaves it as it is)."""
    top = float(sigma.max()) if sigma.numel() else 0.0
    if top <= 0.0:
        return x
    radius = max(1, math.ceil(3.0 * top))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    safe = sigma.clamp(min=1e-3).unsqueeze(1)
    kernel = torch.exp(-0.5 * (offsets / safe) ** 2)
    kernel = torch.where(sigma.unsqueeze(1) > 0, kernel, (offsets == 0).to(torch.float32))  # 0: the identity
    kernel = kernel / kernel.sum(dim=1, keepdim=True)  # [N, k]
    n = x.shape[0]
    y = F.pad(x.transpose(0, 1), (radius, radius, radius, radius), mode="reflect")  # [1, N, S+2r, S+2r]
    y = F.conv2d(y, kernel.view(n, 1, 1, -1), groups=n)
    y = F.conv2d(y, kernel.view(n, 1, -1, 1), groups=n)
    return y.transpose(0, 1)


class FeatureViews(Dataset):
    """The features of K views of each training image: items ([K, C, h, w] float32, target).

    ``plain`` is view 0 (the site's float32 feature pack rows), ``extra`` views 1..K-1 (float16);
    :meth:`gather` assembles a batch in float32 without going through the items one by one.
    """

    def __init__(self, plain: np.ndarray, extra: np.ndarray, y: np.ndarray) -> None:
        if len(plain) != len(extra) or len(plain) != len(y):
            raise ValueError(f"views of {len(plain)} / {len(extra)} images for {len(y)} targets")
        self.plain, self.extra = plain, extra
        self.y = torch.from_numpy(np.ascontiguousarray(y))

    @property
    def views(self) -> int:
        return 1 + int(self.extra.shape[1])

    def __len__(self) -> int:
        return len(self.plain)

    def gather(self, idx: np.ndarray | Sequence[int]) -> torch.Tensor:
        """float32 [len(idx), K, C, h, w]: view 0 then the extra views of the images at ``idx``."""
        idx = np.asarray(idx, dtype=np.int64)
        out = np.empty((len(idx), self.views, *self.plain.shape[1:]), np.float32)
        out[:, 0] = self.plain[idx]
        out[:, 1:] = self.extra[idx]
        return torch.from_numpy(out)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.gather([i])[0], self.y[i]
