"""Training-step throughput of the fedxray models, with and without DP-SGD, as JSON on stdout.

For each model and image size it times one training step (forward, loss, backward, optimizer
step; batch 16 of random data) for:

* ``plain_bn``      the plain torchvision model (BatchNorm), no DP: the speed to beat;
* ``dp_ready_no_dp`` the DP-ready model (GroupNorm, no in-place ops), trained without DP:
                    what the architecture change alone costs;
* ``dp_<mode>``     DP-SGD through ``common.dp`` in each Opacus grad-sample mode
                    (hooks, functorch, ew, ghost); a mode that fails is reported with its error.

For the ScatterNet (the DP default) the sites train only its head, on scattering features cached
at the site; group ``scatternet-head`` times exactly that (features precomputed, batch
``--head-batch``): ``head_no_dp`` (same head, plain SGD), ``head_dp_hooks`` (Opacus' hooks) and
``head_dp_closed_form`` (common.dp_linear, what fedxray uses), and reports DP / no-DP ratios.

Optional variants (field ``variant``): ``--explore`` adds channels_last memory format,
``--opacus-conv`` adds hooks/ghost with Opacus' own conv routines instead of DPConv2d's.
``--train-part last-block|head`` trains only that part of the CNNs in every case (plain and DP
alike): DP fine-tuning from a site's own weights (``init-weights``), which is what the CNNs are
for under DP.

The cases of one (model, size) run round-robin, one step each in turn, so load from other
processes on a shared machine hits them alike. Each case reports wall-clock images/s (median
and best step) and images per CPU-second (steadier under load). The best DP mode is the one
with the most images per CPU-second; ``common.models.grad_sample_mode`` is set from it.

Usage (from the repository root; progress on stderr):
    .venv/bin/python benchmarks/train_throughput.py > bench.json
    .venv/bin/python benchmarks/train_throughput.py --device cuda --sizes 224
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Run as a script: the repository root makes `common` importable without PYTHONPATH. The
# helpers are imported as `_util` from this folder, because opacus installs a top-level
# package named `benchmarks` that would shadow `benchmarks._util`.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# OpenMP threads that spin while they wait for each other make a training step 10-20x slower
# when other processes hold the cores (measured here: 5-9 s instead of 0.35 s per step); on a
# shared machine only passive waiting gives figures that mean anything. Must be set before
# torch loads OpenMP; set OMP_WAIT_POLICY=ACTIVE to measure the default behaviour.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from _util import (  # noqa: E402
    machine_info,
    per_cpu_second,
    print_json,
    progress,
    set_threads,
    throughput,
    time_call,
)
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from common.dp import GRAD_SAMPLE_MODES, dp_step, make_private  # noqa: E402
from common.models import MODEL_NAMES, TRAIN_PARTS, DPConv2d, build_model, grad_sample_mode  # noqa: E402

NUM_OUTPUTS = 3  # a small multilabel head, like a few findings
# Goal: DP training speed relative to the plain BatchNorm model, on CPU at 64 px.
GOALS: dict[str, float] = {"mobilenet_v2": 0.8, "densenet121": 0.5}
GOAL_SIZE = 64
HEAD_GOAL = 0.9  # the ScatterNet head: DP >= 0.9x its own non-DP speed (issue 15)


@dataclass
class Case:
    """One configuration to time, and what was measured."""

    label: str
    build: Callable[[], Callable[[], None]]  # returns the step function
    variant: str = ""  # e.g. "channels_last" for explored variants
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    error: str | None = None


#: What the CNN cases train (``--train-part``): all parameters, or DP fine-tuning's last block + head / head.
TRAIN_PART = ["all"]


def _batch(size: int, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.rand(batch, 1, size, size, device=device)
    y = torch.randint(0, 2, (batch, NUM_OUTPUTS), device=device).float()
    return x, y


def _plain_case(
    name: str, dp_form: bool, x: torch.Tensor, y: torch.Tensor, channels_last: bool
) -> Callable[[], Callable[[], None]]:
    def build() -> Callable[[], None]:
        model = build_model(name, num_outputs=NUM_OUTPUTS, dp=dp_form, train_part=TRAIN_PART[0]).to(x.device)
        inputs = x
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
            inputs = x.contiguous(memory_format=torch.channels_last)
        model.train()
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
        criterion = nn.BCEWithLogitsLoss()

        def step() -> None:
            optimizer.zero_grad()
            criterion(model(inputs), y).backward()
            optimizer.step()

        return step

    return build


def _dp_case(
    name: str,
    mode: str,
    x: torch.Tensor,
    y: torch.Tensor,
    channels_last: bool,
    opacus_conv: bool = False,
) -> Callable[[], Callable[[], None]]:
    def build() -> Callable[[], None]:
        model = build_model(name, num_outputs=NUM_OUTPUTS, dp=True, train_part=TRAIN_PART[0]).to(x.device)
        if opacus_conv:  # back to plain nn.Conv2d: Opacus' own per-sample routines
            for module in model.modules():
                if isinstance(module, DPConv2d):
                    module.__class__ = nn.Conv2d
        inputs = x
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
            inputs = x.contiguous(memory_format=torch.channels_last)
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
        loader = DataLoader(TensorDataset(x.cpu(), y.cpu()), batch_size=len(x))
        pt = make_private(
            model, optimizer, loader,
            noise_multiplier=1.0, max_grad_norm=1.0, mode=mode,
            criterion=nn.BCEWithLogitsLoss(), poisson_sampling=False,
        )

        def step() -> None:
            dp_step(pt, inputs, y)

        return step

    return build


def _head_cases(size: int, batch: int, device: torch.device) -> list[Case]:
    """The ScatterNet head on cached features: no DP, DP through Opacus' hooks, DP in closed form."""
    from common.dp import PerSampleLoss

    full = build_model("scatternet", num_outputs=NUM_OUTPUTS, image_size=size, dp=True)
    with torch.no_grad():
        feats = full.scattering(torch.rand(batch, 1, size, size)).to(device)
    y = torch.randint(0, 2, (batch, NUM_OUTPUTS), device=device).float()

    def head() -> nn.Module:
        h = build_model("scatternet", num_outputs=NUM_OUTPUTS, image_size=size, dp=True).head.to(device)
        nn.init.normal_(h.classifier.weight, std=0.01)
        return h

    def plain() -> Callable[[], None]:
        model = head()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
        loss = PerSampleLoss(nn.BCEWithLogitsLoss())

        def step() -> None:
            optimizer.zero_grad()
            loss(model(feats), y).backward()
            optimizer.step()

        return step

    def private(closed_form: bool) -> Callable[[], Callable[[], None]]:
        def build() -> Callable[[], None]:
            model = head()
            optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
            pt = make_private(model, optimizer, DataLoader(TensorDataset(feats.cpu(), y.cpu()), batch_size=batch),
                              noise_multiplier=1.0, max_grad_norm=0.1, mode=grad_sample_mode("scatternet"),
                              criterion=nn.BCEWithLogitsLoss(), poisson_sampling=False)
            return lambda: dp_step(pt, feats, y, closed_form=closed_form) and None

        return build

    return [Case("head_no_dp", plain), Case("head_dp_hooks", private(False)),
            Case("head_dp_closed_form", private(True))]


def _head_summary(size: int, results: list[dict[str, Any]]) -> dict[str, Any]:
    by = {r["config"]: r for r in results if "error" not in r}
    out: dict[str, Any] = {"model": "scatternet-head", "size": size}
    base = by.get("head_no_dp")
    for cfg in ("head_dp_hooks", "head_dp_closed_form"):
        if base and cfg in by:
            out[f"ratio_{cfg.removeprefix('head_')}_over_no_dp_cpu"] = round(
                by[cfg]["images_per_cpu_second"] / base["images_per_cpu_second"], 3)
            out[f"ratio_{cfg.removeprefix('head_')}_over_no_dp_wall_median"] = round(
                by[cfg]["wall"]["median_per_s"] / base["wall"]["median_per_s"], 3)
    return out


def _cases(
    name: str,
    x: torch.Tensor,
    y: torch.Tensor,
    modes: list[str],
    explore: bool,
    opacus_conv: bool,
) -> list[Case]:
    cases = [
        Case("plain_bn", _plain_case(name, False, x, y, False)),
        Case("dp_ready_no_dp", _plain_case(name, True, x, y, False)),
    ]
    cases += [Case(f"dp_{mode}", _dp_case(name, mode, x, y, False)) for mode in modes]
    if explore:
        cases += [
            Case("plain_bn", _plain_case(name, False, x, y, True), "channels_last"),
            Case("dp_ready_no_dp", _plain_case(name, True, x, y, True), "channels_last"),
        ]
        cases += [
            Case(f"dp_{mode}", _dp_case(name, mode, x, y, True), "channels_last")
            for mode in modes
        ]
    if opacus_conv:
        cases += [
            Case(f"dp_{mode}", _dp_case(name, mode, x, y, False, True), "opacus_conv")
            for mode in modes
            if mode in ("hooks", "ghost")  # the modes that use the registered samplers
        ]
    return cases


def _run_group(cases: list[Case], warmup: int, steps: int, device: torch.device) -> None:
    """Build every case, warm each up, then time them round-robin."""
    steppers: dict[int, Callable[[], None]] = {}
    for i, case in enumerate(cases):
        try:
            steppers[i] = case.build()
            for _ in range(warmup):
                time_call(steppers[i], device)
        except Exception as err:  # noqa: BLE001 - a failing mode is a result, not a crash
            case.error = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
            steppers.pop(i, None)
            progress(f"  {case.label} {case.variant}: failed: {case.error}")
    for round_ in range(steps):
        for i, stepper in steppers.items():
            wall, cpu = time_call(stepper, device)
            cases[i].wall.append(wall)
            cases[i].cpu.append(cpu)
        progress(f"  round {round_ + 1}/{steps} done")


def _case_result(name: str, size: int, batch: int, case: Case) -> dict[str, Any]:
    result: dict[str, Any] = {"model": name, "size": size, "config": case.label}
    if case.variant:
        result["variant"] = case.variant
    if case.error:
        result["error"] = case.error
        return result
    result["wall"] = throughput(case.wall, batch)
    result["images_per_cpu_second"] = per_cpu_second(case.cpu, batch)
    return result


def _summary(name: str, size: int, results: list[dict[str, Any]]) -> dict[str, Any]:
    """Best DP mode (by images per CPU-second) and its ratio to the plain model."""
    base = [r for r in results if "error" not in r and not r.get("variant")]
    by_config = {r["config"]: r for r in base}
    dp = [r for r in base if r["config"].startswith("dp_") and r["config"] != "dp_ready_no_dp"]
    summary: dict[str, Any] = {"model": name, "size": size}
    plain = by_config.get("plain_bn")
    if not dp or plain is None:
        summary["error"] = "no DP mode or no plain model measured"
        return summary
    best = max(dp, key=lambda r: r["images_per_cpu_second"])
    summary.update(
        best_dp_mode=best["config"].removeprefix("dp_"),
        dp_modes_by_cpu_speed=[
            r["config"].removeprefix("dp_")
            for r in sorted(dp, key=lambda r: -r["images_per_cpu_second"])
        ],
        ratio_best_dp_over_plain_cpu=round(
            best["images_per_cpu_second"] / plain["images_per_cpu_second"], 3
        ),
        ratio_best_dp_over_plain_wall_median=round(
            best["wall"]["median_per_s"] / plain["wall"]["median_per_s"], 3
        ),
    )
    ready = by_config.get("dp_ready_no_dp")
    if ready is not None:
        summary["ratio_dp_ready_no_dp_over_plain_cpu"] = round(
            ready["images_per_cpu_second"] / plain["images_per_cpu_second"], 3
        )
        summary["ratio_best_dp_over_dp_ready_no_dp_cpu"] = round(
            best["images_per_cpu_second"] / ready["images_per_cpu_second"], 3
        )
    return summary


def _goals(summaries: list[dict[str, Any]], device: torch.device) -> list[dict[str, Any]]:
    goals = []
    for name, target in GOALS.items():
        entry: dict[str, Any] = {
            "model": name,
            "goal": f"DP(best mode) >= {target}x plain BatchNorm speed, CPU, {GOAL_SIZE} px",
        }
        found = [s for s in summaries if s["model"] == name and s["size"] == GOAL_SIZE]
        if device.type != "cpu" or not found or "error" in found[0]:
            entry["met"] = None
            entry["note"] = f"not measured in this run (needs CPU and size {GOAL_SIZE})"
        else:
            ratio = found[0]["ratio_best_dp_over_plain_cpu"]
            entry.update(
                ratio_cpu=ratio,
                ratio_wall_median=found[0]["ratio_best_dp_over_plain_wall_median"],
                met=ratio >= target,
            )
        goals.append(entry)
    for s in summaries:
        if s["model"] == "scatternet-head" and "ratio_dp_closed_form_over_no_dp_cpu" in s:
            ratio = s["ratio_dp_closed_form_over_no_dp_cpu"]
            goals.append({"model": "scatternet-head", "goal": f"DP >= {HEAD_GOAL}x its own non-DP speed, cached "
                          f"features, {s['size']} px", "ratio_cpu": ratio,
                          "ratio_wall_median": s["ratio_dp_closed_form_over_no_dp_wall_median"],
                          "met": ratio >= HEAD_GOAL if device.type == "cpu" else None})
    return goals


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODEL_NAMES))
    parser.add_argument("--sizes", default="64,128", help="image sizes in px, comma-separated")
    parser.add_argument("--modes", default=",".join(GRAD_SAMPLE_MODES))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per case")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per case")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--head-batch", type=int, default=1024,
                        help="batch of the scatternet-head group (the DP default, sample-rate 1.0, steps on a site's "
                             "whole training split: 200-2,000 images in the study)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--train-part", default="all", choices=TRAIN_PARTS,
                        help="CNNs: what trains, in every case alike (last-block / head: DP fine-tuning from "
                             "init-weights, the CNNs' DP use)")
    parser.add_argument(
        "--explore", action="store_true", help="also time channels_last variants"
    )
    parser.add_argument(
        "--opacus-conv",
        action="store_true",
        help="also time hooks/ghost with Opacus' own conv samplers (what DPConv2d gains)",
    )
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda given but torch sees no CUDA device; use --device cpu")
    set_threads(args.threads)
    TRAIN_PART[0] = args.train_part
    torch.manual_seed(0)
    models = [m for m in args.models.split(",") if m]
    sizes = [int(s) for s in args.sizes.split(",") if s]
    modes = [m for m in args.modes.split(",") if m]
    for name in models:
        grad_sample_mode(name)  # unknown names fail here, before any timing

    results: list[dict[str, Any]] = []
    summaries: list[dict[str, Any]] = []
    machine_before = machine_info(device)
    for name in models:
        if name == "scatternet":  # what a site trains: the head on cached features
            for size in sizes:
                progress(f"scatternet head on cached features {size}px")
                cases = _head_cases(size, args.head_batch, device)
                _run_group(cases, args.warmup, args.steps, device)
                group = [_case_result("scatternet-head", size, args.head_batch, c) for c in cases]
                results += group
                summaries.append(_head_summary(size, group))
        for size in sizes:
            progress(f"{name} {size}px")
            x, y = _batch(size, args.batch, device)
            cases = _cases(name, x, y, modes, args.explore, args.opacus_conv)
            _run_group(cases, args.warmup, args.steps, device)
            group = [_case_result(name, size, args.batch, c) for c in cases]
            results += group
            summaries.append(_summary(name, size, group))

    print_json(
        {
            "benchmark": "train_throughput",
            "settings": vars(args),
            "machine_at_start": machine_before,
            "load_average_at_end": machine_info(device)["load_average_1_5_15"],
            "chosen_modes": {name: grad_sample_mode(name) for name in models},
            "results": results,
            "summary": summaries,
            "goals": _goals(summaries, device),
        }
    )


if __name__ == "__main__":
    main()
