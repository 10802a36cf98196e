"""`fl-client status` on a folder that holds no privacy ledger: an error, never "nothing spent"."""

from __future__ import annotations

from pathlib import Path

import pytest

from client.cli import main


@pytest.mark.parametrize("json_out", [False, True])
def test_a_folder_without_a_ledger_is_an_error_not_nothing_spent(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                 json_out: bool) -> None:
    typo = tmp_path / "stat"  # e.g. `--state-dir fedxray-site/stat`
    typo.mkdir()
    assert main(["status", "--state-dir", str(typo), *(["--json"] if json_out else [])]) == 2
    out, err = capsys.readouterr()
    assert out == ""  # no JSON document with spent_epsilon 0.0
    [line] = [x for x in err.splitlines() if x.startswith("fl-client status: no privacy ledger")]
    assert str(typo) in line and "not a site's state dir" in line and "fl-client start" in line
    assert "FEDXRAY_SITE_HOME" in line and "privacy_ledger.json" in line


def test_a_state_dir_without_charges_says_so_and_still_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "salt").write_text("x")  # `fl-client start` or `check --state-dir` used it; no ledger (yet, or removed)
    assert main(["status", "--state-dir", str(state)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "recorded no charge" in err and str(state) in err
