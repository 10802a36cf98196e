"""common/progress.py: a bar on a terminal, a line every few seconds in a log, nothing for a quick step."""

from __future__ import annotations

import io

import numpy as np
import pytest

from common import progress as progress_module
from common.progress import PREFIX, ProgressLines, progress


def test_a_quick_step_prints_nothing_a_long_one_a_line_every_few_seconds() -> None:
    quiet = io.StringIO()
    with ProgressLines(10, "reading images", "file", every=60.0, stream=quiet) as shown:
        shown.update(10)
    assert quiet.getvalue() == ""
    log = io.StringIO()
    with ProgressLines(4, "computing features", "img", every=0.0, stream=log) as shown:
        for _ in range(4):
            shown.update(1)
    lines = log.getvalue().splitlines()
    assert lines[0].startswith(f"{PREFIX}computing features 1/4 img (25%), ")
    assert lines[-1].startswith(f"{PREFIX}computing features 4/4 img (100%), ") and len(lines) == 5  # 4 + the last


def test_no_bar_off_a_terminal_even_when_asked(capsys: pytest.CaptureFixture[str]) -> None:
    assert isinstance(progress(3, "x", bar=True), ProgressLines)  # pytest's stderr is not a terminal


def test_reading_a_site_says_how_far_it_got_when_not_on_a_terminal(tmp_path, dicom_writer, monkeypatch,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """Before, a site's decoding was silent in a log (minutes before round 1 of `make demo`)."""
    from common.dataset import scan_site

    monkeypatch.setattr(progress_module, "LINE_EVERY_S", 0.0)
    for i in range(3):
        dicom_writer(tmp_path / "NORMAL" / f"{i}.dcm", np.full((8, 8), 0.5), patient_id=f"P{i}")
    scan_site(tmp_path, salt="s")
    err = capsys.readouterr().err
    assert f"{PREFIX}reading images 3/3 file (100%)" in err
