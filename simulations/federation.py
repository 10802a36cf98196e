"""Run the fedxray Flower app over simulated hospitals, through Flower's Simulation Engine.

The same ServerApp and ClientApp as a deployment run here: fl-sim starts a private simulation
SuperLink on loopback (free ports, its own FLWR_HOME, runtime dependency installation off,
telemetry off), submits the app with ``flwr run`` and stops the SuperLink afterwards. Flower
fixes simulated node_config to {partition-id, num-partitions}, so the hospitals are described in
``sites.json`` (one entry per simulated site) inside ``sim-root``; client/site.py maps a
partition id to its entry.

On one machine Flower's Ray backend starts a private Ray instance sized to this machine. With
``ray_address`` the simulation attaches to an existing Ray cluster instead (Ray's own
``RAY_ADDRESS``, which Flower's backend passes through to ``ray.init``): the site actors are then
spread over the cluster's nodes by Ray's scheduler, and every node must see the same fedxray
install, ``sim-root`` and hospital folders at the same paths (docs/operations.md).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from common.bundle import BundleError, stage_app
from common.config_fields import to_toml
from common.processes import free_port, offline_env, stop_process, wait_http
from common.progress import PREFIX as PROGRESS_PREFIX
from simulations.progress import round_progress
from simulations.run_guard import MARK_ENV, run_marker, stop_run_processes

log = logging.getLogger(__name__)

CONNECTION = "fedxray-sim"
#: The sites file client/site.py reads (its SITES_FILE; tests/simulations/test_many_sites.py keeps them equal).
#: Not imported from there: client.site imports torch, and fl-sim's own process need not hold torch's
#: half a gigabyte while the sites train.
SITES_FILE = "sites.json"


class SimulationRunError(RuntimeError):
    """The simulated federation could not run; the message says where the logs are."""


def write_sites(sim_root: Path, sites: Sequence[dict[str, Any]]) -> Path:
    """sites.json: per simulated hospital its node-config (data-dir, state-dir, site-name, budget)."""
    sim_root.mkdir(parents=True, exist_ok=True)
    path = sim_root / SITES_FILE
    path.write_text(json.dumps(list(sites), indent=2))
    return path


@contextmanager
def simulation_superlink(sim_root: Path, *, ray_address: str | None = None) -> Iterator[dict[str, str]]:
    """A private simulation SuperLink on loopback; yields the environment for `flwr` commands.

    Its simulation process runs the site actors on a private Ray instance, or on the Ray cluster
    at ``ray_address`` (a RAY_ADDRESS inherited from the caller's environment is ignored: which
    cluster runs hospitals' code is chosen on the command line, never by accident).
    """
    flwr_home = sim_root / "flwr-home"
    if flwr_home.exists():
        shutil.rmtree(flwr_home)
    flwr_home.mkdir(parents=True)
    port, control = free_port(), free_port()
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n'
        f'[superlink.{CONNECTION}]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    env = offline_env(flwr_home)
    env[MARK_ENV] = run_marker(sim_root)  # Flower's and Ray's processes inherit it: see simulations/run_guard.py
    env["RAY_DEDUP_LOGS"] = "0"  # the sites' progress lines look alike: Ray would fold them into "[repeated 3x]"
    env.pop("RAY_ADDRESS", None)
    if ray_address:
        env["RAY_ADDRESS"] = ray_address
    log_path = sim_root / "superlink.log"
    cmd = [
        "flower-superlink", "--insecure", "--simulation", "--isolation", "subprocess",
        "--control-api-address", f"127.0.0.1:{control}", "--host", "127.0.0.1", "--port", str(port),
        "--disable-runtime-dependency-installation",
    ]
    with open(log_path, "wb") as fh:
        proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, cwd=sim_root,
                                start_new_session=True)
    try:
        try:
            wait_http(f"http://127.0.0.1:{port}/health", proc, 60.0, "the simulation SuperLink", log_path)
        except RuntimeError as err:
            raise SimulationRunError(str(err)) from None
        yield env
    finally:
        # Everything at once, before any of them exits by itself: the SuperLink's SuperExec runs in a session of
        # its own, flwr-simulation and its Ray cluster below it, and Ray's agents follow their raylet only after
        # about a minute (they are found as the raylet's descendants, so it must still run when we look).
        stop_run_processes(sim_root)
        stop_process(proc)


_ROUND_LINE = re.compile(r"round (\d+)/(\d+): pooled AUC")
#: A simulated site's progress line (common/progress.py), as Ray passes the site actors' output on to the log stream
#: (up to any colour code Ray appends).
_SITE_PROGRESS = re.compile(re.escape(PROGRESS_PREFIX) + r"[^\x1b]*[^\x1b\s]")
#: The coordinator's milestones before round 1, shown as they happen (Ray's start takes a minute on 2 busy cores).
_MILESTONE = re.compile(r"Starting Flower Simulation|\d+ site\(s\) connected \(\d+ needed\): starting|"
                        r"waiting for sites: .*")


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity: `taskset`, a container's cpuset), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def federation_config(num_supernodes: int, *, cpus_per_site: float, gpus_per_site: float, total_cpus: int,
                      ray_address: str | None = None) -> str:
    """`flwr run --federation-config` for Flower's Ray backend.

    Ray runs as many site actors at once as its CPUs allow (CPUs / ``cpus_per_site``); Flower
    queues the other sites' messages for them, so 1,000 sites cost no more actors than 3. On an
    existing cluster the cluster's resources decide (``ray.init`` refuses ``num_cpus`` there).
    """
    config = (f"num-supernodes={num_supernodes} client-resources-num-cpus={max(1, int(cpus_per_site))} "
              f"client-resources-num-gpus={gpus_per_site}")
    if not ray_address:
        config += f" init-args-num-cpus={total_cpus}"
    return config


def run_app(sim_root: Path, run_config: dict[str, Any], *, num_supernodes: int, cpus_per_site: float = 1.0,
            gpus_per_site: float = 0.0, total_cpus: int | None = None, timeout: float = 3600.0,
            progress: bool = True, ray_address: str | None = None) -> Path:
    """Submit the fedxray app to a private simulation SuperLink and wait for the run to finish.

    ``ray_address``: run the site actors on this existing Ray cluster (``ray start --head``'s
    address, e.g. ``10.0.0.5:6379``) instead of a private Ray instance on this machine.
    Returns the path of the log of the run. Raises ``SimulationRunError`` when the run fails.
    """
    overrides = sim_root / "run-config.toml"
    overrides.write_text(to_toml(run_config))
    total = total_cpus or usable_cpus()
    run_log = sim_root / "run.log"
    with simulation_superlink(sim_root, ray_address=ray_address) as env:
        federation = federation_config(num_supernodes, cpus_per_site=cpus_per_site, gpus_per_site=gpus_per_site,
                                       total_cpus=total, ray_address=ray_address)
        try:
            app = stage_app(sim_root)  # only the app files: `flwr run` walks all of its folder
        except BundleError as err:
            raise SimulationRunError(f"{err}; fl-sim runs from a source checkout (see README)") from None
        cmd = ["flwr", "run", str(app), CONNECTION, "--run-config", str(overrides),
               "--federation-config", federation, "--stream"]
        bar = None
        rounds = int(run_config.get("num-server-rounds", 0))
        if progress and rounds:
            bar = tqdm(total=rounds, desc="federated rounds", unit="round")
        started = time.monotonic()
        with open(run_log, "a") as fh:  # a resumed run adds to its log
            fh.write(f"===== fl-sim {'resume' if run_config.get('resume-from') else 'run'} "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    cwd=sim_root, start_new_session=True)
            assert proc.stdout is not None
            last_round = 0
            try:
                shown_progress = ""
                for line in proc.stdout:
                    fh.write(line)
                    fh.flush()
                    # Before round 1: the coordinator's milestones, then the sites' reading and caching. Each once:
                    # Flower writes every record twice (console and file form).
                    early = _SITE_PROGRESS.search(line) or (_MILESTONE.search(line) if not last_round else None)
                    if early and early.group(0).strip() != shown_progress:
                        shown_progress = early.group(0).strip()
                        shown = f"  {'site ' if early.re is _SITE_PROGRESS else ''}{shown_progress}"
                        if bar is not None:
                            bar.write(shown)
                        else:
                            print(shown, flush=True)
                        continue
                    m = _ROUND_LINE.search(line)
                    if m and int(m.group(1)) != last_round:  # Flower writes each record twice (console, file form)
                        last_round = int(m.group(1))
                        shown = round_progress(line[m.start():].strip())
                        if bar is not None:
                            bar.n = int(m.group(1))
                            bar.refresh()
                            bar.write(shown)
                        else:
                            print(shown, flush=True)  # a line per round as it happens, also in logs and CI
                    if time.monotonic() - started > timeout:
                        raise SimulationRunError(f"the run took longer than {timeout:.0f} s; see {run_log}")
                proc.wait()
            finally:
                # `flwr run` only streams the log: on the way out after a stop signal or an error it gets 2 s, not
                # the default 15 (Ctrl-C must stop everything within seconds); the run's own processes are stopped
                # all at once by the caller (stop_run_processes), and a finished `flwr run` has already exited.
                stop_process(proc, timeout=2.0)
                if bar is not None:
                    bar.close()
        if proc.returncode != 0:
            raise SimulationRunError(f"`flwr run` failed (exit {proc.returncode}); see {run_log}")
    return run_log
