"""Typed, validated configuration: one place that turns raw settings into frozen dataclasses.

Two kinds of settings exist, and they belong to different people:

* ``RunConfig`` is chosen by the coordinator for one federated run. It comes from
  ``[tool.flwr.app.config]`` in pyproject.toml (kebab-case keys), overridden with
  ``flwr run -c 'key=value'`` or ``fl-sim --set key=value``, and reaches every site as
  ``context.run_config``.
* ``SiteConfig`` (common/site_config.py) is chosen by a hospital for its own SuperNode (``--node-config``): where its data
  and state live, and the privacy budget it is willing to spend. A coordinator cannot change it.

Both are validated as a whole: every problem is collected and reported in one ``ConfigError``, so
an operator fixes a configuration in one pass instead of one error per restart.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from common.config_fields import build_config, check_one_of, check_range, fields_to_mapping
from common.labels import BLANK_CHOICES, UNCERTAIN_CHOICES, LabelError, parse_pos_weight
from common.operating_point import OperatingPoint, parse_operating_point

MODEL_CHOICES = ("scatternet", "mobilenet_v2", "densenet121")
HEAD_CHOICES = ("linear", "cnn")
INTENSITY_CHOICES = ("equalise", "none")
MAX_VIEWS = 8
TRAIN_PART_CHOICES = ("all", "last-block", "head")
#: DP-SGD steps a site should take over a run: below ~150 noisy steps the head has not converged
#: at the epsilons hospitals use (docs/models.md, "DP defaults"). local-epochs = 0 plans for it.
MIN_DP_STEPS = 150
TASK_CHOICES = ("binary", "multiclass", "multilabel")
STRATEGY_CHOICES = ("fedavg", "fedprox", "fedadam", "trimmed-mean", "median")
EXPORT_ROUND_CHOICES = ("last", "best")
OPTIMIZER_CHOICES = ("adam", "sgd")
DEVICE_CHOICES = ("auto", "cpu", "cuda")


#: Settings that suit each kind of model (docs/models.md), filled in by fl-sim and the study when the user
#: sets none of them. The RunConfig defaults are the scatternet ones.
RECOMMENDED: dict[str, dict[str, Any]] = {
    "scatternet": {"optimizer": "sgd", "learning-rate": 1.0, "momentum": 0.9, "max-grad-norm": 0.1, "sample-rate": 1.0},
    # Without DP nothing clips gradients: SGD at 1.0 diverges; Adam 1e-3 was best of 1e-2/1e-3/1e-4 on pooled validation (docs/results.md).
    "scatternet-no-dp": {"optimizer": "adam", "learning-rate": 1e-3, "sample-rate": 0.2},
    "cnn": {"optimizer": "adam", "learning-rate": 1e-3, "max-grad-norm": 1.0, "sample-rate": 0.0, "batch-size": 32},
}


def recommended_settings(model: str, dp: bool = True) -> dict[str, Any]:
    """Optimiser and sampling settings that suit ``model`` with or without DP (kebab-case run-config keys)."""
    if model == "scatternet":
        return dict(RECOMMENDED["scatternet" if dp else "scatternet-no-dp"])
    return dict(RECOMMENDED["cnn"])


@dataclass(frozen=True)
class RunConfig:
    """Settings of one federated run, identical at every site (kebab-case keys in pyproject)."""

    num_server_rounds: int = 10  # federated rounds to run
    model: str = "scatternet"  # architecture, see common.models.MODEL_NAMES (scatternet: the DP-first default)
    head: str = "linear"  # scatternet: linear (logistic regression on the features) | cnn (two small conv layers)
    scatter_j: int = 2  # scatternet: scattering scale J (features are image-size / 2^J on a side)
    intensity: str = "equalise"  # scatternet: per-image intensity standardisation in the model graph: equalise | none
    pool: int = 2  # scatternet linear head: mean of pool x pool cells of the normalised coefficients (1: every cell)
    border: float = 0.0  # scatternet linear head: cells in this outer share of the image per side are ignored (0: none)
    views: int = 4  # scatternet linear head: views per training image (1 plain + acquisition-augmented), gradients averaged before clipping
    train_part: str = "all"  # CNNs: all | last-block | head (DP fine-tuning from init-weights trains few parameters)
    init_weights: str = ""  # coordinator-side weights file for the initial global model (e.g. pretrained); never downloaded
    image_size: int = 64  # images are resized to image_size x image_size (whole image, bilinear)
    task: str = "binary"  # binary (sigmoid, 1 output) | multiclass (softmax) | multilabel (sigmoids)
    labels: tuple[str, ...] = ("opacity",)  # binary: the positive finding; else the class/finding names
    label_column: str = ""  # labels.csv column the targets come from (e.g. subtype); "": chosen from the table (docs/tasks.md)
    uncertain: str = "ignore"  # a finding column's -1: ignore (masked from loss and metrics) | positive | negative
    blank: str = "negative"  # an empty finding cell (not mentioned): negative | ignore (masked)
    pos_weight: str = "none"  # binary/multilabel BCE weight of positives: none | w | w1,w2,... per label; never from site counts
    local_epochs: int = 0  # passes over the site's training split per round (expected, under DP); 0: enough for MIN_DP_STEPS
    sample_rate: float = 1.0  # share of a site's training images per step (Poisson under DP); 0: use batch-size
    batch_size: int = 32  # used when sample-rate is 0: expected batch; under DP, Poisson rate batch/n_train
    learning_rate: float = 1.0  # client optimiser learning rate (scatternet SGD: 1.0; CNNs with Adam: about 1e-3)
    optimizer: str = "sgd"  # client optimiser: sgd (with momentum) | adam
    momentum: float = 0.9  # SGD momentum
    augment: bool = True  # CNNs: training augmentation (rotation, brightness/contrast, resized crop); scatternet: none
    val_fraction: float = 0.2  # kept for older configs: each site validates on its own share (node config val-fraction)
    seed: int = 0  # seeds splits, sampling, initial weights
    dp: bool = True  # DP-SGD at the sites; off only when the site also allows it
    target_epsilon: float = 8.0  # per-site epsilon for the planned rounds (used when noise-multiplier=0)
    noise_multiplier: float = 0.0  # fixed noise multiplier; 0 derives it from target-epsilon
    max_grad_norm: float = 0.1  # per-sample gradient clipping bound (L2); 0.1 suits the scatternet head
    delta: float = 1e-5  # DP delta the run asks for; a site may insist on a smaller one
    strategy: str = "fedavg"  # fedavg | fedprox | fedadam | trimmed-mean | median
    proximal_mu: float = 0.01  # FedProx proximal term weight
    server_learning_rate: float = 0.01  # FedAdam server learning rate
    trim_beta: float = 0.2  # trimmed-mean: fraction trimmed at each end
    server_clip: float = 0.0  # coordinator-side L2 clip of each site's update before aggregation (0: off)
    max_site_examples: int = 0  # most images a site's declared size counts for in FedAvg's average; 0: every site weighs the same
    fraction_train: float = 1.0  # fraction of connected sites asked to train each round
    min_sites: int = 2  # sites needed before a round starts
    round_timeout: float = 3600.0  # seconds to wait for replies in a round
    wait_timeout: float = 600.0  # seconds to wait for min-sites before giving up
    early_stop_patience: int = 0  # stop after this many rounds without pooled AUC gain (0: never)
    weight_average: float = 0.0  # coordinator: decay of the moving average of the global weights it evaluates and exports (0: off)
    export_round: str = "last"  # last | best (by the noised pooled validation AUC; docs/models.md: last did better)
    operating_point: str = "youden"  # binary: youden | sensitivity:X | specificity:X, the rule for the exported threshold
    run_name: str = ""  # run directory name under runs-dir; empty: a timestamped name
    runs_dir: str = "runs"  # where run directories go (absolute, or relative to the coordinator's cwd)
    resume_from: str = ""  # run directory to continue from its last checkpoint (fl-server resume sets it)
    parity_data: str = ""  # coordinator's reference radiographs (never patient data) for the ONNX parity check
    sim_root: str = ""  # simulation only: folder whose sites.json describes the simulated hospitals
    tracking_uri: str = ""  # MLflow: "" a SQLite store beside the run folders, "off", or a tracking URI (server/tracking.py)

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any]) -> RunConfig:
        """Build from kebab-case (or snake_case) keys; unknown keys and bad values all reported."""
        return build_config(cls, raw, "run config", _check_run)

    def to_mapping(self) -> dict[str, Any]:
        """Kebab-case dict (tuples as comma-separated strings), the form Flower's run config uses."""
        return fields_to_mapping(self)

    @property
    def num_outputs(self) -> int:
        """Model outputs: 1 for a binary task (the positive finding), else one per label."""
        return 1 if self.task == "binary" else len(self.labels)

    @property
    def pos_weights(self) -> tuple[float, ...]:
        """Loss weight of each output's positives (common.labels.parse_pos_weight); () for none."""
        return parse_pos_weight(self.pos_weight, self.num_outputs)

    def model_kwargs(self) -> dict[str, Any]:
        """What common.models.build_model needs besides the name, so every caller builds the same model."""
        return {"num_outputs": self.num_outputs, "image_size": self.image_size, "scatter_j": self.scatter_j,
                "head": self.head, "train_part": self.train_part, "intensity": self.intensity, "pool": self.pool,
                "border": self.border}

    @property
    def feature_views(self) -> int:
        """Views per training image the sites train on: ``views`` for the ScatterNet's linear head, else 1
        (the CNNs augment on the fly, and the closed-form per-image clipping of several views needs a linear head)."""
        return self.views if self.model == "scatternet" and self.head == "linear" else 1

    def sampling(self, n_train: int) -> tuple[float, int]:
        """(sample rate, expected batch) for a site with ``n_train`` training images.

        ``sample-rate`` > 0 fixes the rate, so a small site takes as many steps per epoch as a
        large one; otherwise the rate is ``batch-size / n_train``.
        """
        n = max(1, int(n_train))
        if self.sample_rate > 0:
            batch = max(1, round(self.sample_rate * n))
            return batch / n, batch
        batch = min(self.batch_size, n)
        return batch / n, batch

    @property
    def operating(self) -> OperatingPoint:
        """The operating-point rule (common/operating_point.py), parsed; validated with the rest of the config."""
        return parse_operating_point(self.operating_point)

    def epochs_per_round(self, sample_rate: float) -> int:
        """Local epochs per round: as configured, or (0) enough for MIN_DP_STEPS steps over the run."""
        if self.local_epochs > 0:
            return self.local_epochs
        return max(1, math.ceil(MIN_DP_STEPS * sample_rate / self.num_server_rounds))


def _check_run(c: RunConfig) -> list[str]:
    p: list[str] = []
    check_one_of(p, "model", c.model, MODEL_CHOICES)
    check_one_of(p, "head", c.head, HEAD_CHOICES)
    check_one_of(p, "train-part", c.train_part, TRAIN_PART_CHOICES)
    check_range(p, "scatter-j", c.scatter_j, 1, 4)
    check_one_of(p, "intensity", c.intensity, INTENSITY_CHOICES)
    check_range(p, "views", c.views, 1, MAX_VIEWS)
    check_range(p, "pool", c.pool, 1, 4)
    check_range(p, "border", c.border, 0.0, 0.3)
    check_range(p, "sample-rate", c.sample_rate, 0.0, 1.0)
    check_range(p, "momentum", c.momentum, 0.0, 0.99)
    check_one_of(p, "task", c.task, TASK_CHOICES)
    check_one_of(p, "uncertain", c.uncertain, UNCERTAIN_CHOICES)
    check_one_of(p, "blank", c.blank, BLANK_CHOICES)
    check_one_of(p, "strategy", c.strategy, STRATEGY_CHOICES)
    check_one_of(p, "export-round", c.export_round, EXPORT_ROUND_CHOICES)
    check_one_of(p, "optimizer", c.optimizer, OPTIMIZER_CHOICES)
    check_range(p, "num-server-rounds", c.num_server_rounds, 1, 10_000)
    check_range(p, "image-size", c.image_size, 16, 1024)
    check_range(p, "local-epochs", c.local_epochs, 0, 100)
    check_range(p, "batch-size", c.batch_size, 1, 4096)
    check_range(p, "learning-rate", c.learning_rate, 0.0, 10.0, lo_open=True)
    check_range(p, "val-fraction", c.val_fraction, 0.0, 0.9, lo_open=True)
    check_range(p, "max-grad-norm", c.max_grad_norm, 0.0, 1e6, lo_open=True)
    check_range(p, "delta", c.delta, 0.0, 0.1, lo_open=True)
    check_range(p, "proximal-mu", c.proximal_mu, 0.0, 100.0)
    check_range(p, "server-learning-rate", c.server_learning_rate, 0.0, 10.0, lo_open=True)
    check_range(p, "trim-beta", c.trim_beta, 0.0, 0.49)
    check_range(p, "server-clip", c.server_clip, 0.0, 1e9)
    check_range(p, "max-site-examples", c.max_site_examples, 0, 100_000_000)
    check_range(p, "fraction-train", c.fraction_train, 0.0, 1.0, lo_open=True)
    check_range(p, "min-sites", c.min_sites, 1, 100_000)
    check_range(p, "round-timeout", c.round_timeout, 1.0, 7 * 86400.0)
    check_range(p, "wait-timeout", c.wait_timeout, 1.0, 7 * 86400.0)
    check_range(p, "early-stop-patience", c.early_stop_patience, 0, 10_000)
    try:
        parse_operating_point(c.operating_point)
    except ValueError as err:
        p.append(f"`operating-point`: {err}")
    check_range(p, "weight-average", c.weight_average, 0.0, 0.99)
    if c.dp:
        if c.noise_multiplier == 0.0:
            check_range(p, "target-epsilon", c.target_epsilon, 0.0, 1000.0, lo_open=True)
        else:
            check_range(p, "noise-multiplier", c.noise_multiplier, 0.0, 1000.0, lo_open=True)
    if c.image_size % 2:
        p.append(f"`image-size` = {c.image_size}: use an even size (models downsample by 2 repeatedly)")
    if c.model == "scatternet" and 2 ** (c.scatter_j + 2) > c.image_size:
        p.append(f"`scatter-j` = {c.scatter_j} at `image-size` = {c.image_size}: the scattering needs images of at "
                 f"least {2 ** (c.scatter_j + 2)} px; lower scatter-j or raise image-size")
    if not c.labels:
        p.append("`labels` is empty: name the positive finding (binary) or every class / finding")
    elif c.task == "binary" and len(c.labels) != 1:
        p.append(f"`labels` = {','.join(c.labels)}: a binary task names exactly one positive finding")
    elif c.task == "multiclass" and len(c.labels) < 2:
        p.append("`labels`: a multiclass task needs at least two class names")
    try:
        if c.pos_weights and c.task == "multiclass":
            p.append("`pos-weight` weighs sigmoid outputs (binary, multilabel); set none for a multiclass task")
    except LabelError as err:
        p.append(str(err))
    if len({lab.lower() for lab in c.labels}) != len(c.labels):
        p.append(f"`labels` = {','.join(c.labels)}: names must be unique (case-insensitive)")
    if "/" in c.run_name or c.run_name.startswith("."):
        p.append(f"`run-name` = {c.run_name!r}: a plain folder name (no '/', not starting with '.')")
    return p
