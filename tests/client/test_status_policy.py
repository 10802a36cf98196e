"""`fl-client approve --policy` and `fl-client status`: the run settings a site accepts, approved and shown."""

from __future__ import annotations

import json

from client.cli import main
from client.ledger import PrivacyLedger

POLICY = 'task = "binary"\ntarget-epsilon = { max = 3.0 }\nlabel-column = { one-of = ["", "label"] }\n'


def test_an_approved_policy_is_shown_by_status(tmp_path, capsys):
    state = tmp_path / "state"
    state.mkdir()
    (tmp_path / "policy.toml").write_text(POLICY)
    assert main(["approve", "--policy", str(tmp_path / "policy.toml"), "--state-dir", str(state), "--note", "board"]) == 0
    assert "target-epsilon <= 3" in capsys.readouterr().out
    # status reads a ledger (a state dir without one is an error, client/status.py): one charge makes it
    PrivacyLedger(state, site="a", max_epsilon=10.0, delta=1e-5).reserve(
        run_id="run@0", round=1, fingerprint="f" * 64, noise_multiplier=5.0, sample_rate=0.1, steps=10,
        max_grad_norm=1.0, n_train=100, delta=1e-5, patients=["p1"])
    assert main(["status", "--state-dir", str(state), "--json"]) == 0
    policy = json.loads(capsys.readouterr().out)["policy"]
    assert sorted(policy["rules"]) == ['label-column one of "", "label"', 'target-epsilon <= 3', 'task = "binary"']
    assert policy["note"] == "board" and policy["approved"]
    assert main(["status", "--state-dir", str(state)]) == 0
    text = capsys.readouterr().out
    assert "run policy approved" in text and "target-epsilon <= 3" in text
    assert main(["approve", "--clear-policy", "--state-dir", str(state)]) == 0
    capsys.readouterr()
    assert main(["status", "--state-dir", str(state)]) == 0
    assert "run policy: none approved" in capsys.readouterr().out


def test_a_bad_policy_file_is_one_line_and_approves_nothing(tmp_path, capsys):
    state = tmp_path / "state"
    (tmp_path / "policy.toml").write_text("target-epsilon = { max = 'lots' }\n")
    assert main(["approve", "--policy", str(tmp_path / "policy.toml"), "--state-dir", str(state)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fl-client approve: the run policy cannot be used") and err.count("\n") == 1
    assert not (state / "run-policy.json").exists()
