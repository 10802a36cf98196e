"""What the coordinator checks of a site's update before it enters the average, from its own numbers.

The coordinator does not take a site's word for how far its weights may move: it derives the
steps and the noise of a round from the run config (``server_plan``), bounds the update's norm by
what the local optimiser could produce from clipped, noised gradients (``update_norm_bound``),
rejects updates with other keys, shapes or NaN/Inf (``check_update``), optionally clips each update
(``clip_update``, run config ``server-clip``), and caps a site's weight by the run's
``max-site-examples`` (``site_weight``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from common.config import RunConfig
from common.privacy import noise_for_target

# An update is rejected when its L2 norm exceeds this multiple of what the optimiser can move
# the weights in the round's steps (Adam: about lr per weight per step; SGD: lr x clipped+noised
# gradient, amplified by momentum). Generous on purpose: it catches broken or hostile updates,
# not unlucky ones.
NORM_SAFETY = 4.0


@dataclass(frozen=True)
class ServerPlan:
    """What the coordinator expects of every site's round, computed from the run config alone.

    With ``sample-rate`` set, every site takes the same number of steps per round and (for a
    target epsilon) the same noise multiplier whatever its size, so the coordinator can check an
    update against its own numbers instead of the ones the site reports.
    """

    steps: int | None  # None: depends on the site's size (batch-size mode)
    noise_multiplier: float | None  # None: not known to the server


def server_plan(run: RunConfig) -> ServerPlan:
    if run.sample_rate <= 0:
        return ServerPlan(None, run.noise_multiplier or None)
    epochs = run.epochs_per_round(run.sample_rate)
    steps = math.ceil(epochs / run.sample_rate - 1e-9)
    sigma: float | None = None
    if run.dp:
        if run.noise_multiplier:
            sigma = run.noise_multiplier
        else:
            try:
                sigma = noise_for_target(run.target_epsilon, run.delta, run.sample_rate, steps * run.num_server_rounds)
            except ValueError:
                sigma = None
    return ServerPlan(steps, sigma)


def site_weight(declared: int, run: RunConfig) -> int:
    """A site's weight in the average: its declared size capped at ``max-site-examples``; 1 each without a cap.

    The coordinator cannot check what a site declares, so a site claiming 1,000,000 images would
    otherwise take nearly all the weight; the cap is the coordinator's own figure (docs/privacy.md).
    """
    if run.max_site_examples <= 0:
        return 1
    return max(1, min(int(declared), run.max_site_examples))


def update_norm_bound(run: RunConfig, steps: int, n_params: int, noise_multiplier: float, batch: float = 1.0) -> float:
    """Largest plausible L2 norm of one round's weight change at a site (see NORM_SAFETY).

    ``batch`` is the site's expected batch (the server's estimate; 1 when unknown, the loosest).
    """
    steps = max(1, steps)
    if run.optimizer == "adam":
        per_step = run.learning_rate * math.sqrt(n_params)
    else:
        grad = run.max_grad_norm * (1.0 + noise_multiplier * math.sqrt(n_params) / max(1.0, batch))
        per_step = run.learning_rate * grad / (1.0 - run.momentum)
    return NORM_SAFETY * per_step * steps


def clip_update(update: dict[str, np.ndarray], reference: dict[str, np.ndarray], max_norm: float) -> tuple[dict[str, np.ndarray], float]:
    """Scale a site's weight change to at most ``max_norm`` (L2 over all float tensors); (update, original norm)."""
    sq = sum(float(np.sum((update[k].astype(np.float64) - reference[k]) ** 2)) for k in reference if reference[k].dtype.kind == "f")
    norm = math.sqrt(sq)
    if norm <= max_norm or norm == 0.0:
        return update, norm
    scale = max_norm / norm
    out = {k: (reference[k] + scale * (update[k] - reference[k])).astype(update[k].dtype) if reference[k].dtype.kind == "f"
           else update[k] for k in update}
    return out, norm


def check_update(
    update: dict[str, np.ndarray], reference: dict[str, np.ndarray], *, bound: float | None
) -> str | None:
    """Why an update must be rejected, or None when it is acceptable."""
    if set(update) != set(reference):
        missing = sorted(set(reference) - set(update))[:3]
        extra = sorted(set(update) - set(reference))[:3]
        return f"keys differ from the global model (missing {missing}, unexpected {extra})"
    sq = 0.0
    for key, ref in reference.items():
        arr = update[key]
        if arr.shape != ref.shape:
            return f"shape of {key} is {tuple(arr.shape)}, expected {tuple(ref.shape)}"
        if arr.dtype.kind == "f":
            if not np.all(np.isfinite(arr)):
                return f"{key} contains NaN or Inf"
            sq += float(np.sum((arr.astype(np.float64) - ref.astype(np.float64)) ** 2))
    norm = math.sqrt(sq)
    if bound is not None and norm > bound:
        return f"update norm {norm:.3g} is far beyond the clipping/optimiser bound {bound:.3g}"
    return None
