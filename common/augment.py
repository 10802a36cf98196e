"""Training augmentation for chest radiographs (off for validation).

What varies between hospitals and between exposures, and what a classifier should ignore:
small patient rotation (within +-15 degrees), exposure and processing (brightness/contrast), and
collimation / positioning (random resized crop that keeps most of the thorax).

No horizontal flips: a chest radiograph has a left and a right. The heart lies on the left,
laterality markers are burnt in, and dextrocardia / situs inversus are findings of their own; a
flipped image is an anatomically implausible patient, and a finding's side can matter for the
label. (docs/data.md explains the same choice for users.)
"""

from __future__ import annotations

import torch


def train_transform(image_size: int) -> torch.nn.Module:
    """Random rotation, brightness/contrast jitter and a mild resized crop; input/output [1,S,S] in [0,1]."""
    from torchvision.transforms import v2  # deferred: only the CNNs augment, and the import costs 0.5 s

    return v2.Compose(
        [
            v2.RandomAffine(degrees=15.0),
            v2.RandomResizedCrop(image_size, scale=(0.8, 1.0), ratio=(0.9, 1.1), antialias=True),
            v2.ColorJitter(brightness=0.2, contrast=0.2),
            v2.Lambda(lambda x: x.clamp(0.0, 1.0)),
        ]
    )


def identity(x: torch.Tensor) -> torch.Tensor:
    """Validation: no augmentation (images are already at the run's size in the cache)."""
    return x
