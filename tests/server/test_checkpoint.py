"""Checkpoints: atomic, newest readable one wins, damaged newest falls back."""

from __future__ import annotations

import numpy as np
import pytest

from server.checkpoint import Checkpoint, latest_checkpoint, save_checkpoint


def _ckpt(r: int) -> Checkpoint:
    return Checkpoint(r, {"w": np.full((2, 2), float(r), np.float32)}, {"threshold": 0.4, "m_t": {"w": np.ones(2)}},
                      [{"round": i} for i in range(1, r + 1)], {"num-server-rounds": 5})


def test_round_trip_and_latest(tmp_path):
    for r in (1, 2, 3, 4):
        save_checkpoint(tmp_path, _ckpt(r), keep=2)
    assert len(list((tmp_path / "checkpoints").glob("round-*.pt"))) == 2
    c = latest_checkpoint(tmp_path)
    assert c.round == 4 and c.weights["w"][0, 0] == 4.0 and len(c.history) == 4
    assert np.allclose(c.strategy_state["m_t"]["w"], 1.0)


def test_damaged_newest_falls_back(tmp_path):
    save_checkpoint(tmp_path, _ckpt(1))
    save_checkpoint(tmp_path, _ckpt(2))
    (tmp_path / "checkpoints" / "round-00002.pt").write_bytes(b"half a file")
    assert latest_checkpoint(tmp_path).round == 1


def test_no_checkpoint(tmp_path):
    assert latest_checkpoint(tmp_path) is None


def test_initial_model_follows_the_run_seed():
    """Two coordinators with the same seed start every site from the same global weights."""
    import torch

    from server.run_setup import preflight

    cfg = {"model": "mobilenet_v2", "image-size": 32, "seed": 3}
    a = preflight(cfg)[1].state_dict()
    b = preflight(cfg)[1].state_dict()
    c = preflight({**cfg, "seed": 4})[1].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_run_identity_is_new_per_run_and_kept_on_resume(tmp_path):
    """Sites tell a retry from a new run by this id: same name and seed must still differ."""
    from server.run_setup import run_identity

    first = run_identity(tmp_path, resuming=False)
    assert (tmp_path / "run-id").read_text().strip() == first
    assert run_identity(tmp_path, resuming=True) == first  # resume: the same run
    second = run_identity(tmp_path, resuming=False)  # a new run in the same directory
    assert second != first and len(second) == 16


def test_initial_model_from_local_weights_for_dp_fine_tuning(tmp_path):
    """init-weights: the coordinator starts the run from a local weights file (e.g. pretrained on a public set);
    train-part=head leaves only the classifier trainable, so DP noise touches a few thousand parameters."""
    import torch

    from common.models import build_model, count_parameters
    from server.run_setup import PreflightError, preflight

    source = build_model("mobilenet_v2", num_outputs=1)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(0.01)  # not what a fresh build gives
    path = tmp_path / "pretrained.pt"
    torch.save(source.state_dict(), path)
    cfg = {"model": "mobilenet_v2", "image-size": 32, "init-weights": str(path), "train-part": "head",
           "optimizer": "adam", "learning-rate": 1e-3}
    _, model = preflight(cfg)
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in source.state_dict().items())
    assert count_parameters(model) == sum(p.numel() for p in model.classifier.parameters())  # head only
    with pytest.raises(PreflightError, match="init-weights .* is not a file: give a local weights file"):
        preflight({**cfg, "init-weights": str(tmp_path / "missing.pt")})
