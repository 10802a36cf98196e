"""The hash-chained audit log: a chain verifies; every kind of tampering and a torn write are named; writers may race."""

from __future__ import annotations

import multiprocessing
import stat

import pytest

from common.audit import (
    GENESIS,
    TORN_EVENT,
    AuditError,
    read_entries,
    record,
    render_entry,
    try_record,
    verify,
)


def _log(tmp_path, n: int = 4):
    path = tmp_path / "audit.log"
    for i in range(n):
        record(path, "site-admitted", site=f"site-{i}", round=i, epsilon=0.5 * i)
    return path


def _lines(path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


class TestRecord:
    def test_chain_verifies_and_links(self, tmp_path):
        path = _log(tmp_path)
        entries = read_entries(path)
        assert [e["seq"] for e in entries] == [1, 2, 3, 4]
        assert entries[0]["prev_hash"] == GENESIS
        assert all(b["prev_hash"] == a["hash"] for a, b in zip(entries, entries[1:]))
        assert entries[2]["details"] == {"site": "site-2", "round": 2, "epsilon": 1.0}
        assert entries[0]["who"] and entries[0]["time"].endswith("+00:00")
        report = verify(path)
        assert report.ok and report.events == 4 and report.head == entries[-1]["hash"]
        assert "intact, 4 event(s)" in report.summary()
        assert stat.S_IMODE(path.stat().st_mode) == 0o600  # other local users cannot rewrite it

    def test_paths_and_bad_values_are_refused(self, tmp_path):
        path = tmp_path / "audit.log"
        with pytest.raises(AuditError, match="file path"):
            record(path, "evaluation-answered", data="/srv/pacs/patient-123/img.dcm")
        with pytest.raises(AuditError, match="file path"):
            record(path, "evaluation-answered", files=["ok", "C:\\data\\x.dcm"])
        with pytest.raises(AuditError, match="is a bytes"):
            record(path, "round-trained", digest=b"\x00")
        with pytest.raises(AuditError, match="not a name"):
            record(path, "Round Trained")
        with pytest.raises(AuditError, match="written by the log itself"):
            record(path, TORN_EVENT)
        assert not path.exists()  # nothing half-recorded

    def test_numpy_and_not_measured_numbers_are_plain_json(self, tmp_path):
        import numpy as np

        entry = record(tmp_path / "audit.log", "run-finished", pooled_auc=float("nan"), eps=[1.0, float("inf")],
                       images=np.int64(120), epsilon=np.float32(0.5))
        assert entry["details"] == {"pooled_auc": None, "eps": [1.0, None], "images": 120, "epsilon": 0.5}
        assert verify(tmp_path / "audit.log").ok

    def test_try_record_reports_instead_of_raising(self, tmp_path):
        assert try_record(tmp_path / "audit.log", "bundle-approved", hash="ab" * 32) is None
        problem = try_record(tmp_path / "missing-folder" / "audit.log", "bundle-approved")
        assert problem is not None and "cannot open the audit log" in problem

    def test_render_entry_is_one_line(self, tmp_path):
        line = render_entry(read_entries(_log(tmp_path, 1))[0])
        assert "\n" not in line and "site-admitted" in line and "site=site-0" in line


class TestTampering:
    def test_editing_any_byte_of_a_past_line_is_detected(self, tmp_path):
        path = _log(tmp_path)
        lines = _lines(path)
        target = lines[1]
        for i in range(len(target) - 1):  # every byte but the newline
            edited = bytearray(target)
            edited[i] = ord("X") if edited[i] != ord("X") else ord("Y")
            path.write_bytes(b"".join([lines[0], bytes(edited), *lines[2:]]))
            report = verify(path)
            assert not report.ok and report.bad_line == 2, (i, report.summary())
        assert "line 2: altered" in report.summary()

    def test_a_recomputed_line_still_breaks_the_chain(self, tmp_path):
        """Rewriting line 2 with a valid hash of its own (an editor who knows the format) breaks line 3."""
        from common.audit import _line

        path = _log(tmp_path)
        lines = _lines(path)
        entry = read_entries(path)[1]
        entry["details"]["site"] = "someone-else"
        forged, _ = _line(entry)
        path.write_bytes(b"".join([lines[0], forged, *lines[2:]]))
        report = verify(path)
        assert not report.ok and report.bad_line == 3 and "breaks the chain" in report.problem

    def test_deleting_a_line_is_detected(self, tmp_path):
        path = _log(tmp_path)
        lines = _lines(path)
        path.write_bytes(b"".join([lines[0], *lines[2:]]))
        report = verify(path)
        assert not report.ok and report.bad_line == 2 and "event(s) 2..2 are missing" in report.problem

    def test_reordering_is_detected(self, tmp_path):
        path = _log(tmp_path)
        lines = _lines(path)
        path.write_bytes(b"".join([lines[0], lines[2], lines[1], lines[3]]))
        report = verify(path)
        assert not report.ok and report.bad_line == 2

    def test_removing_the_last_lines_is_caught_by_an_anchor(self, tmp_path):
        path = _log(tmp_path)
        head = verify(path).head
        lines = _lines(path)
        path.write_bytes(b"".join(lines[:-1]))
        assert verify(path).ok  # a shorter chain is valid on its own ...
        report = verify(path, anchor=head)  # ... but not against the head recorded elsewhere
        assert not report.ok and "not in the chain" in report.problem
        with pytest.raises(AuditError, match="head hash"):
            verify(path, anchor="abc")

    def test_missing_log_fails(self, tmp_path):
        report = verify(tmp_path / "audit.log")
        assert not report.ok and "no audit log" in report.summary()


class TestCrashes:
    def test_truncated_last_line_is_reported_then_sealed(self, tmp_path):
        path = _log(tmp_path)
        data = path.read_bytes()
        path.write_bytes(data[:-40])  # the last line cut short, as a crash mid-write leaves it
        report = verify(path)
        assert not report.ok and report.bad_line == 4 and "incomplete" in report.problem
        record(path, "site-removed", site="site-1")  # the next writer seals the torn line, never drops it
        report = verify(path)
        assert report.ok and report.torn == (4,) and "torn by a crash" in report.summary()
        entries = read_entries(path)
        assert [e["event"] for e in entries[-2:]] == [TORN_EVENT, "site-removed"]
        assert entries[-2]["details"]["line"] == 4 and entries[-1]["seq"] == 6
        assert data[:-40] in path.read_bytes()  # the torn bytes are still there

    def test_a_fake_seal_does_not_hide_an_edit(self, tmp_path):
        path = _log(tmp_path)
        lines = _lines(path)
        path.write_bytes(b"".join([lines[0], b"garbage\n", *lines[2:]]))
        report = verify(path)
        assert not report.ok and report.bad_line == 2 and "altered" in report.problem

    def test_complete_line_without_newline_is_kept(self, tmp_path):
        path = _log(tmp_path)
        path.write_bytes(path.read_bytes()[:-1])  # crash between the line and its newline
        record(path, "site-removed", site="x")
        report = verify(path)
        assert report.ok and report.events == 5 and report.torn == ()

    def test_damaged_last_line_refuses_new_events(self, tmp_path):
        path = _log(tmp_path)
        lines = _lines(path)
        path.write_bytes(b"".join([*lines[:-1], b"{edited}\n"]))
        with pytest.raises(AuditError, match="damaged at its last whole line"):
            record(path, "site-removed", site="x")


def _append_many(path: str, who: str, n: int) -> None:
    for i in range(n):
        record(path, "round-trained", writer=who, round=i)


def test_concurrent_appenders_keep_one_valid_chain(tmp_path):
    path = tmp_path / "audit.log"
    ctx = multiprocessing.get_context("fork")  # nothing heavy is imported here; fork keeps the test fast
    procs = [ctx.Process(target=_append_many, args=(str(path), f"p{k}", 60)) for k in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    report = verify(path)
    assert report.ok, report.summary()
    entries = read_entries(path)
    assert len(entries) == 120 and [e["seq"] for e in entries] == list(range(1, 121))
    assert {e["details"]["writer"] for e in entries} == {"p0", "p1"}
