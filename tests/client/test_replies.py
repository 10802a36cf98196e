"""client/replies.py: stored replies re-sent byte for byte, releases remembered after their weights are pruned."""

from __future__ import annotations

import os
import time

import torch

from client.replies import RELEASED, ReplyStore, release_id, run_folder


def _reply(r: int) -> dict:
    return {"weights": {"w": torch.full((2,), float(r))}, "metrics": {"round": r}}


def test_the_latest_two_rounds_keep_their_weights_and_every_release_is_remembered(tmp_path):
    store = ReplyStore(tmp_path, "run-x")
    for r in range(1, 6):
        store.put(r, str(r) * 64, _reply(r))
    kept = sorted(p.name.split("-")[1] for p in store.root.glob("*.pt"))
    assert kept == ["00004", "00005"]  # the latest round and the one before it (a resume may retry it)
    assert store.get(5, "5" * 64)["metrics"]["round"] == 5 and store.get(1, "1" * 64) is None
    assert store.releases(1, "1" * 64) == 1  # pruned, yet known as released: asking again is a new release
    assert store.releases(1, "2" * 64) == 0
    assert oct((store.root / f"round-00005-{'5' * 64}.pt").stat().st_mode & 0o777) == "0o600"
    assert oct((store.root / RELEASED).stat().st_mode & 0o777) == "0o600"


def test_keys_hold_the_full_digest_so_a_shared_prefix_finds_nothing(tmp_path):
    store = ReplyStore(tmp_path, "run-x")
    store.put(1, "ab" * 32, _reply(1))
    assert store.get(1, "ab" * 8 + "cd" * 24) is None and store.releases(1, "ab" * 8 + "cd" * 24) == 0


def test_an_edited_stored_reply_is_not_sent(tmp_path):
    store = ReplyStore(tmp_path, "run-x")
    store.put(1, "a" * 64, _reply(1))
    other = ReplyStore(tmp_path, "run-y")
    other.put(1, "a" * 64, _reply(7))
    (store.root / f"round-00001-{'a' * 64}.pt").write_bytes((other.root / f"round-00001-{'a' * 64}.pt").read_bytes())
    assert store.get(1, "a" * 64) is None  # not the bytes this run released


def test_runs_and_kinds_have_their_own_folders_named_by_a_hash(tmp_path):
    a, b = run_folder(tmp_path, "../x", "train"), run_folder(tmp_path, "../x", "evaluate")
    assert a != b and a.parent == b.parent == tmp_path / "replies" and ".." not in a.name
    assert run_folder(tmp_path, "a/b", "train") != run_folder(tmp_path, "a_b", "train")


def test_release_ids_count_releases_of_the_same_round_and_weights():
    assert release_id("run", "d" * 64, 0) == "run@" + "d" * 64
    assert release_id("run", "d" * 64, 1) == "run@" + "d" * 64 + "#2"


def test_other_runs_lose_their_old_weights_but_keep_their_releases(tmp_path):
    old = ReplyStore(tmp_path, "old-run")
    old.put(1, "f" * 64, _reply(1))
    stale = time.time() - 40 * 86400
    for p in old.root.iterdir():
        os.utime(p, (stale, stale))
    ReplyStore(tmp_path, "run-x").put(6, "6" * 64, _reply(6))
    assert not list(old.root.glob("*.pt")) and old.releases(1, "f" * 64) == 1
