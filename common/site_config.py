"""A hospital's own settings for its SuperNode (``--node-config``), validated in one place.

The coordinator chooses the run (``common.config.RunConfig``); the site chooses where its data and
state live, the privacy budget it is willing to spend and the run settings it accepts. Nothing in
a run config can change these.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.config import DEVICE_CHOICES, RunConfig
from common.config_fields import build_config, check_one_of, check_range, fields_to_mapping
from common.labels import LabelError, LabelPolicy, parse_label_map


@dataclass(frozen=True)
class SiteConfig:
    """Settings a hospital owns for its SuperNode (``--node-config``); the coordinator cannot change them."""

    data_dir: Path  # the site's DICOM folder (labels.csv or class subfolders)
    state_dir: Path  # cache, privacy ledger, salt: stays on site, survives restarts
    site_name: str  # name shown to the coordinator (no patient information)
    max_epsilon: float = 10.0  # cumulative privacy budget on this dataset, over all runs
    delta: float = 1e-5  # the delta this site accounts with
    allow_no_dp: bool = False  # whether this site ever trains without DP when a run asks for it
    device: str = "auto"  # auto (CUDA when present) | cpu | cuda
    val_fraction: float = 0.2  # share of this site's patients kept for validation (the split is the site's own)
    eval_noise: float = 10.0  # evaluation noise scale: histograms get 2x (routine) or 0.4x (final) per count; image statistics 1x
    max_evaluations: int = 100  # evaluate replies this site sends per run (each is charged to its budget)
    max_evaluations_per_day: int = 1000  # evaluate replies over all runs in any 24 hours (new runs do not reset it)
    declared_images: int = 0  # the training-set size this site declares: its weight in the average, never a count; 0: weight 1
    max_final_evaluations: int = 2  # of them answered at the final (precise) noise per run (client/eval_noise.py)
    # Run settings this site accepts (a run outside them is refused before anything is read or spent):
    max_image_size: int = 512
    max_local_epochs: int = 200
    max_batch_size: int = 1024
    max_rounds: int = 500
    max_run_epsilon: float = 0.0  # largest target-epsilon a run may plan; 0: up to max-epsilon
    label_map: str = ""  # this site's finding names -> the federation's: "Pleural effusion=Effusion; ..." or a file of such lines
    label_column: str = ""  # this site's labels.csv column for the run's labels (wins over the run's label-column)

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any]) -> SiteConfig:
        return build_config(cls, raw, "site config", _check_site)

    def refusals(self, run: RunConfig) -> list[str]:
        """Every run setting outside what this site accepts, each naming the key, the value and the allowed range."""
        out: list[str] = []
        limit = self.max_run_epsilon or self.max_epsilon
        for key, value, top in (("image-size", run.image_size, self.max_image_size),
                                ("local-epochs", run.local_epochs, self.max_local_epochs),
                                ("batch-size", run.batch_size, self.max_batch_size),
                                ("num-server-rounds", run.num_server_rounds, self.max_rounds)):
            if value > top:
                out.append(f"`{key}` = {value}: this site accepts at most {top} (node config max-{key.removeprefix('num-server-')})")
        if run.dp and not run.noise_multiplier and run.target_epsilon > limit:
            out.append(f"`target-epsilon` = {run.target_epsilon:g}: this site accepts at most {limit:g} per run "
                       "(node config max-run-epsilon)")
        return out

    def to_mapping(self) -> dict[str, Any]:
        return fields_to_mapping(self)

    def label_policy(self, run: RunConfig) -> LabelPolicy:
        """How this site's label table gives the run's targets: the run's -1 / blank policy, the site's column and names."""
        return LabelPolicy(label_column=self.label_column or run.label_column, uncertain=run.uncertain, blank=run.blank,
                           label_map=parse_label_map(self.label_map))


def _check_site(c: SiteConfig) -> list[str]:
    p: list[str] = []
    check_one_of(p, "device", c.device, DEVICE_CHOICES)
    check_range(p, "max-epsilon", c.max_epsilon, 0.0, 1000.0)
    check_range(p, "delta", c.delta, 0.0, 0.1, lo_open=True)
    if not c.site_name or not all(ch.isalnum() or ch in "-_." for ch in c.site_name):
        p.append(f"`site-name` = {c.site_name!r}: use letters, digits, '-', '_' or '.'")
    check_range(p, "val-fraction", c.val_fraction, 0.0, 0.9, lo_open=True)
    check_range(p, "eval-noise", c.eval_noise, 1.0, 1e6)
    check_range(p, "max-evaluations", c.max_evaluations, 0, 100_000)
    check_range(p, "max-evaluations-per-day", c.max_evaluations_per_day, 0, 1_000_000)
    check_range(p, "declared-images", c.declared_images, 0, 100_000_000)
    check_range(p, "max-final-evaluations", c.max_final_evaluations, 0, 100)
    check_range(p, "max-image-size", c.max_image_size, 16, 4096)
    check_range(p, "max-local-epochs", c.max_local_epochs, 1, 1000)
    check_range(p, "max-batch-size", c.max_batch_size, 1, 100_000)
    check_range(p, "max-rounds", c.max_rounds, 1, 100_000)
    check_range(p, "max-run-epsilon", c.max_run_epsilon, 0.0, 1000.0)
    if not c.data_dir.is_dir():
        p.append(f"`data-dir` = {str(c.data_dir)!r} is not a folder: point it at the site's DICOM folder")
    try:
        parse_label_map(c.label_map)
    except LabelError as err:
        p.append(f"`label-map`: {err}")
    return p
