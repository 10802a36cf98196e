"""One site home for every `fl-client` subcommand (client/site_home.py): approve writes where start reads."""

from __future__ import annotations

from pathlib import Path

import pytest

from client.approval import approved_hashes
from client.cli import build_parser, main
from client.site_home import ENV_VAR, apply_site_home, resolve_site_home

HASH = "a" * 64


def _folders(argv: list[str]) -> dict[str, str | None]:
    args = build_parser().parse_args(argv)
    apply_site_home(args, resolve_site_home(getattr(args, "site_home", None)))
    return {k: getattr(args, k, None) for k in ("state_dir", "kit", "dir")}


def test_approve_run_from_another_folder_writes_where_start_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    home = tmp_path / "site"
    monkeypatch.setenv(ENV_VAR, str(home))
    monkeypatch.chdir(tmp_path / "elsewhere" if (tmp_path / "elsewhere").mkdir() is None else tmp_path)
    assert main(["approve", HASH]) == 0
    err = capsys.readouterr().err
    assert f"site home {home} (from {ENV_VAR}): state dir {home / 'state'}" in err
    start = _folders(["start", "--data", str(tmp_path)])
    assert start["state_dir"] == str(home / "state") and start["kit"] == str(home)
    assert HASH in approved_hashes(Path(start["state_dir"]))  # what `start` checks each run against
    assert not (tmp_path / "elsewhere" / "fedxray-site").exists()  # nothing relative to where it was run


def test_every_subcommand_uses_and_names_the_same_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    home = tmp_path / "site"
    monkeypatch.setenv(ENV_VAR, str(home))
    for argv in (["status"], ["audit"], ["approve", "--list"], ["start", "--data", "d"]):
        assert _folders(argv)["state_dir"] == str(home / "state"), argv
    assert _folders(["init", "--site", "a"])["dir"] == str(home)
    assert _folders(["check", "d"])["state_dir"] is None  # optional there: the home's state dir does not exist yet
    (home / "state").mkdir(parents=True)
    assert _folders(["check", "d"])["state_dir"] == str(home / "state")
    assert _folders(["evaluate", "--model", "m", "--data", "d"])["state_dir"] == str(home / "state")
    main(["audit", "--verify"])
    assert f"fl-client audit: site home {home}" in capsys.readouterr().err


def test_flag_then_environment_then_documented_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    monkeypatch.delenv(ENV_VAR, raising=False)
    default = resolve_site_home(None)
    assert (default.path, default.source) == (tmp_path / "user" / "fedxray-site", "default")
    assert "--site-home" in default.describe() and ENV_VAR in default.describe()
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "env"))
    assert resolve_site_home(None).path == tmp_path / "env"
    assert resolve_site_home(str(tmp_path / "flag")).path == tmp_path / "flag"
    assert _folders(["status", "--site-home", str(tmp_path / "flag")])["state_dir"] == str(tmp_path / "flag" / "state")
    assert _folders(["status", "--state-dir", str(tmp_path / "given")])["state_dir"] == str(tmp_path / "given")
    monkeypatch.chdir(tmp_path)
    assert resolve_site_home("rel").path == tmp_path / "rel"  # made absolute once, where it was given
