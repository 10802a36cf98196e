"""simulations/run_folder.py: a finished simulation drops its sites' caches, and only those it owns."""

from __future__ import annotations

from pathlib import Path

from simulations.run_folder import tidy_after_run


def _state(root: Path) -> Path:
    for site in ("hospital-a", "hospital-b"):
        (root / site / "cache" / "v1").mkdir(parents=True)
        (root / site / "cache" / "v1" / "pack.npy").write_bytes(b"x" * 1000)
        (root / site / "privacy_ledger.json").write_text("{}")
    return root


def test_caches_inside_the_folder_go_the_ledgers_stay(tmp_path: Path) -> None:
    state = _state(tmp_path / "sim" / "state")
    said: list[str] = []
    line = tidy_after_run(tmp_path / "sim", state, keep_cache=False, say=said.append)
    assert said == ["removing the sites' image and feature caches (`--keep-cache` keeps them) ..."]
    assert "removed the sites' image and feature caches (0 MB" in line and "--keep-cache" in line
    assert list(state.glob("*/cache")) == [] and len(list(state.glob("*/privacy_ledger.json"))) == 2


def test_kept_when_asked_or_when_the_state_dirs_are_not_the_runs(tmp_path: Path) -> None:
    state = _state(tmp_path / "sim" / "state")
    assert tidy_after_run(tmp_path / "sim", state, keep_cache=True) == ""
    shared = _state(tmp_path / "shared-state")  # fl-sim --state-dir: reused between runs on purpose
    assert tidy_after_run(tmp_path / "sim", shared, keep_cache=False) == ""
    assert len(list(state.glob("*/cache"))) == 2 and len(list(shared.glob("*/cache"))) == 2


def test_latest_points_at_the_newest_simulation_folder(tmp_path: Path) -> None:
    """The quickstart's `runs/sim-*/...` matched two folders after a second run; `runs/latest` is one."""
    from simulations.run_folder import point_latest

    for name in ("sim-20260101-000000", "sim-20260101-000100"):
        (tmp_path / name).mkdir()
        assert point_latest(tmp_path / name) == tmp_path / "latest"
    assert (tmp_path / "latest").resolve() == (tmp_path / "sim-20260101-000100").resolve()
    assert (tmp_path / "latest").readlink() == Path("sim-20260101-000100")  # relative: the runs folder can move
    (tmp_path / "latest").unlink()
    (tmp_path / "latest").mkdir()  # someone's own folder of that name is left alone
    assert point_latest(tmp_path / "sim-20260101-000000") is None and (tmp_path / "latest").is_dir()
