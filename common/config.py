"""Typed, validated configuration: one place that turns raw settings into frozen dataclasses.

Two kinds of settings exist, and they belong to different people:

* ``RunConfig`` is chosen by the coordinator for one federated run. It comes from
  ``[tool.flwr.app.config]`` in pyproject.toml (kebab-case keys), overridden with
  ``flwr run -c 'key=value'`` or ``fl-sim --set key=value``, and reaches every site as
  ``context.run_config``.
* ``SiteConfig`` is chosen by a hospital for its own SuperNode (``--node-config``): where its data
  and state live, and the privacy budget it is willing to spend. A coordinator cannot change it.

Both are validated as a whole: every problem is collected and reported in one ``ConfigError``, so
an operator fixes a configuration in one pass instead of one error per restart.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.labels import BLANK_CHOICES, UNCERTAIN_CHOICES, LabelError, LabelPolicy, parse_label_map, parse_pos_weight

MODEL_CHOICES = ("scatternet", "mobilenet_v2", "densenet121")
HEAD_CHOICES = ("linear", "cnn")
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


class ConfigError(ValueError):
    """One or more settings are invalid; the message lists every problem and how to fix it."""

    def __init__(self, where: str, problems: list[str]) -> None:
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"invalid {where} ({len(problems)} problem(s)):\n{lines}")


@dataclass(frozen=True)
class RunConfig:
    """Settings of one federated run, identical at every site (kebab-case keys in pyproject)."""

    num_server_rounds: int = 10  # federated rounds to run
    model: str = "scatternet"  # architecture, see common.models.MODEL_NAMES (scatternet: the DP-first default)
    head: str = "linear"  # scatternet: linear (logistic regression on the features) | cnn (two small conv layers)
    scatter_j: int = 2  # scatternet: scattering scale J (features are image-size / 2^J on a side)
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
    fraction_train: float = 1.0  # fraction of connected sites asked to train each round
    min_sites: int = 2  # sites needed before a round starts
    round_timeout: float = 3600.0  # seconds to wait for replies in a round
    wait_timeout: float = 600.0  # seconds to wait for min-sites before giving up
    early_stop_patience: int = 0  # stop after this many rounds without pooled AUC gain (0: never)
    export_round: str = "last"  # last | best (by the noised pooled validation AUC; docs/models.md: last did better)
    run_name: str = ""  # run directory name under runs-dir; empty: a timestamped name
    runs_dir: str = "runs"  # where run directories go (absolute, or relative to the coordinator's cwd)
    resume_from: str = ""  # run directory to continue from its last checkpoint (fl-server resume sets it)
    parity_data: str = ""  # coordinator's reference radiographs (never patient data) for the ONNX parity check
    sim_root: str = ""  # simulation only: folder whose sites.json describes the simulated hospitals
    tracking_uri: str = ""  # MLflow: "" a SQLite store beside the run folders, "off", or a tracking URI (server/tracking.py)

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any]) -> RunConfig:
        """Build from kebab-case (or snake_case) keys; unknown keys and bad values all reported."""
        return _build(cls, raw, "run config", _check_run)

    def to_mapping(self) -> dict[str, Any]:
        """Kebab-case dict (tuples as comma-separated strings), the form Flower's run config uses."""
        return _to_mapping(self)

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
                "head": self.head, "train_part": self.train_part}

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

    def epochs_per_round(self, sample_rate: float) -> int:
        """Local epochs per round: as configured, or (0) enough for MIN_DP_STEPS steps over the run."""
        if self.local_epochs > 0:
            return self.local_epochs
        return max(1, math.ceil(MIN_DP_STEPS * sample_rate / self.num_server_rounds))


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
    eval_noise: float = 10.0  # std of the Gaussian noise on each count of the validation score histograms
    max_evaluations: int = 100  # evaluate replies this site sends per run (each is charged to its budget)
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
        return _build(cls, raw, "site config", _check_site)

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
        return _to_mapping(self)

    def label_policy(self, run: RunConfig) -> LabelPolicy:
        """How this site's label table gives the run's targets: the run's -1 / blank policy, the site's column and names."""
        return LabelPolicy(label_column=self.label_column or run.label_column, uncertain=run.uncertain, blank=run.blank,
                           label_map=parse_label_map(self.label_map))


# --------------------------------------------------------------------------- helpers


def _key(name: str) -> str:
    return name.replace("_", "-")


def _to_mapping(obj: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, tuple):
            value = ",".join(value)
        elif isinstance(value, Path):
            value = str(value)
        out[_key(f.name)] = value
    return out


def _coerce(value: Any, typ: Any, key: str, problems: list[str]) -> Any:
    """Convert a raw value (TOML, CLI string) to the field's type, or record why not."""
    type_name = typ if isinstance(typ, str) else getattr(typ, "__name__", str(typ))
    try:
        if type_name == "bool":
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("true", "1", "yes", "on"):
                return True
            if text in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if type_name == "int":
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if type_name == "float":
            if isinstance(value, bool):
                raise ValueError
            result = float(value)
            if not math.isfinite(result):
                raise ValueError
            return result
        if type_name == "Path":
            return Path(str(value)).expanduser()
        if type_name.startswith("tuple"):
            if isinstance(value, (list, tuple)):
                items = [str(v).strip() for v in value]
            else:
                items = [v.strip() for v in str(value).split(",")]
            return tuple(v for v in items if v)
        return str(value)
    except (TypeError, ValueError):
        problems.append(f"`{key}` = {value!r} is not a valid {type_name}")
        return None


def _build(cls: Any, raw: Mapping[str, Any], where: str, check: Any) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    problems: list[str] = []
    values: dict[str, Any] = {}
    for raw_key, value in raw.items():
        name = str(raw_key).replace("-", "_")
        if name not in fields:
            known = ", ".join(sorted(_key(n) for n in fields))
            problems.append(f"unknown key `{raw_key}` (known keys: {known})")
            continue
        coerced = _coerce(value, fields[name].type, _key(name), problems)
        if coerced is not None:
            values[name] = coerced
    for name, f in fields.items():
        no_default = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if no_default and name not in values:
            problems.append(f"`{_key(name)}` is required")
    if any("is required" in p for p in problems):
        raise ConfigError(where, problems)
    # Range checks run on whatever did coerce, so one error lists every problem at once.
    obj = cls(**values)
    problems += check(obj)
    if problems:
        raise ConfigError(where, problems)
    return obj


def _one_of(problems: list[str], key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        problems.append(f"`{key}` = {value!r}: expected one of {', '.join(choices)}")


def _range(problems: list[str], key: str, value: float, lo: float, hi: float, *, lo_open: bool = False) -> None:
    if value < lo or value > hi or (lo_open and value == lo):
        left = "(" if lo_open else "["
        problems.append(f"`{key}` = {value}: expected a value in {left}{lo}, {hi}]")


def _check_run(c: RunConfig) -> list[str]:
    p: list[str] = []
    _one_of(p, "model", c.model, MODEL_CHOICES)
    _one_of(p, "head", c.head, HEAD_CHOICES)
    _one_of(p, "train-part", c.train_part, TRAIN_PART_CHOICES)
    _range(p, "scatter-j", c.scatter_j, 1, 4)
    _range(p, "sample-rate", c.sample_rate, 0.0, 1.0)
    _range(p, "momentum", c.momentum, 0.0, 0.99)
    _one_of(p, "task", c.task, TASK_CHOICES)
    _one_of(p, "uncertain", c.uncertain, UNCERTAIN_CHOICES)
    _one_of(p, "blank", c.blank, BLANK_CHOICES)
    _one_of(p, "strategy", c.strategy, STRATEGY_CHOICES)
    _one_of(p, "export-round", c.export_round, EXPORT_ROUND_CHOICES)
    _one_of(p, "optimizer", c.optimizer, OPTIMIZER_CHOICES)
    _range(p, "num-server-rounds", c.num_server_rounds, 1, 10_000)
    _range(p, "image-size", c.image_size, 16, 1024)
    _range(p, "local-epochs", c.local_epochs, 0, 100)
    _range(p, "batch-size", c.batch_size, 1, 4096)
    _range(p, "learning-rate", c.learning_rate, 0.0, 10.0, lo_open=True)
    _range(p, "val-fraction", c.val_fraction, 0.0, 0.9, lo_open=True)
    _range(p, "max-grad-norm", c.max_grad_norm, 0.0, 1e6, lo_open=True)
    _range(p, "delta", c.delta, 0.0, 0.1, lo_open=True)
    _range(p, "proximal-mu", c.proximal_mu, 0.0, 100.0)
    _range(p, "server-learning-rate", c.server_learning_rate, 0.0, 10.0, lo_open=True)
    _range(p, "trim-beta", c.trim_beta, 0.0, 0.49)
    _range(p, "server-clip", c.server_clip, 0.0, 1e9)
    _range(p, "fraction-train", c.fraction_train, 0.0, 1.0, lo_open=True)
    _range(p, "min-sites", c.min_sites, 1, 100_000)
    _range(p, "round-timeout", c.round_timeout, 1.0, 7 * 86400.0)
    _range(p, "wait-timeout", c.wait_timeout, 1.0, 7 * 86400.0)
    _range(p, "early-stop-patience", c.early_stop_patience, 0, 10_000)
    if c.dp:
        if c.noise_multiplier == 0.0:
            _range(p, "target-epsilon", c.target_epsilon, 0.0, 1000.0, lo_open=True)
        else:
            _range(p, "noise-multiplier", c.noise_multiplier, 0.0, 1000.0, lo_open=True)
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


def _check_site(c: SiteConfig) -> list[str]:
    p: list[str] = []
    _one_of(p, "device", c.device, DEVICE_CHOICES)
    _range(p, "max-epsilon", c.max_epsilon, 0.0, 1000.0)
    _range(p, "delta", c.delta, 0.0, 0.1, lo_open=True)
    if not c.site_name or not all(ch.isalnum() or ch in "-_." for ch in c.site_name):
        p.append(f"`site-name` = {c.site_name!r}: use letters, digits, '-', '_' or '.'")
    _range(p, "val-fraction", c.val_fraction, 0.0, 0.9, lo_open=True)
    _range(p, "eval-noise", c.eval_noise, 1.0, 1e6)
    _range(p, "max-evaluations", c.max_evaluations, 0, 100_000)
    _range(p, "max-image-size", c.max_image_size, 16, 4096)
    _range(p, "max-local-epochs", c.max_local_epochs, 1, 1000)
    _range(p, "max-batch-size", c.max_batch_size, 1, 100_000)
    _range(p, "max-rounds", c.max_rounds, 1, 100_000)
    _range(p, "max-run-epsilon", c.max_run_epsilon, 0.0, 1000.0)
    if not c.data_dir.is_dir():
        p.append(f"`data-dir` = {str(c.data_dir)!r} is not a folder: point it at the site's DICOM folder")
    try:
        parse_label_map(c.label_map)
    except LabelError as err:
        p.append(f"`label-map`: {err}")
    return p


def to_toml(values: Mapping[str, Any]) -> str:
    """Flat ``key = value`` TOML, as `flwr run --run-config FILE` and ``--node-config`` read it."""
    def one(value: Any) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, (int, float)):
            return repr(value)
        return json.dumps(str(value))

    return "".join(f"{k} = {one(v)}\n" for k, v in values.items())
