"""client/run_pin.py: a run's privacy settings and its launched run, fixed at its first message."""

from __future__ import annotations

import pytest

from client.run_pin import PINNED, PINS_FILE, RunPinError, RunPins, pinned_settings
from common.config import RunConfig


def _run(**kw) -> RunConfig:
    return RunConfig.from_mapping({"target-epsilon": 2.0, **kw})


def test_the_first_message_pins_and_the_same_settings_pass_again(tmp_path):
    pins = RunPins(tmp_path)
    assert pins.pin("run-a", _run(), 11) is True
    assert pins.pin("run-a", _run(**{"learning-rate": 0.5}), 11) is False  # not privacy-relevant: free to change
    assert pins.run_settings("run-a") == pinned_settings(_run())
    assert set(pinned_settings(_run())) == set(PINNED)


def test_changed_settings_within_a_run_are_refused_naming_each(tmp_path):
    pins = RunPins(tmp_path)
    pins.pin("run-a", _run(), 11)
    with pytest.raises(RunPinError) as info:
        pins.pin("run-a", _run(**{"target-epsilon": 8.0, "num-server-rounds": 50}), 11)
    assert "`target-epsilon` = 8.0, but this run began with 2.0" in str(info.value)
    assert "`num-server-rounds`" in str(info.value)
    assert pins.run_settings("run-a")["target-epsilon"] == 2.0  # the pin stays


def test_one_launched_run_is_one_run_and_a_resume_may_add_one(tmp_path):
    pins = RunPins(tmp_path)
    pins.pin("run-a", _run(), 11)
    with pytest.raises(RunPinError, match="one launched run is one run"):
        pins.pin("run-b", _run(), 11)  # a new run id in a message of the same launched run
    assert pins.run_settings("run-b") is None
    pins.pin("run-a", _run(), 12)  # fl-server resume: a new launched run continuing run-a
    pins.pin("run-b", _run(), 13)


def test_a_damaged_pin_file_refuses_instead_of_forgetting(tmp_path):
    (tmp_path / PINS_FILE).write_text("{broken")
    with pytest.raises(RunPinError, match="refuses runs until"):
        RunPins(tmp_path).pin("run-a", _run(), 1)
