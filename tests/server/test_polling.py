"""server/polling.py: replies are polled at a short, growing interval, never busy, within the timeout."""

from __future__ import annotations

from types import SimpleNamespace

from server.polling import POLL_MAX_S, POLL_MIN_S, collect_replies


class Clock:
    """Time that moves only when the code under test sleeps."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def _reply(msg_id: str) -> SimpleNamespace:
    return SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=msg_id))


def _site_replies(arrivals: dict[str, float], clock: Clock):
    """A pull that returns each message's reply once its arrival time has passed."""
    sent: set[str] = set()

    def pull(ids: set[str]):
        ready = [m for m in ids if arrivals[m] <= clock.now and m not in sent]
        sent.update(ready)
        return [_reply(m) for m in ready]

    return pull


class TestCollectReplies:
    def test_all_replies_collected_soon_after_the_last_arrives(self):
        clock = Clock()
        got = collect_replies(_site_replies({"a": 0.3, "b": 2.0}, clock), ["a", "b"], 60.0, sleep=clock.sleep,
                              clock=lambda: clock.now)
        assert sorted(r.metadata.reply_to_message_id for r in got) == ["a", "b"]
        assert clock.now < 2.0 + POLL_MAX_S  # Flower's fixed poll would have waited until 3.0 s
        assert min(clock.sleeps) >= POLL_MIN_S - 1e-9 and max(clock.sleeps) <= POLL_MAX_S

    def test_interval_grows_while_nothing_arrives(self):
        clock = Clock()
        collect_replies(_site_replies({"a": 10.0}, clock), ["a"], 60.0, sleep=clock.sleep, clock=lambda: clock.now)
        assert clock.sleeps[0] == POLL_MIN_S and clock.sleeps[1] > clock.sleeps[0]
        assert clock.sleeps[-1] == POLL_MAX_S
        assert len(clock.sleeps) < 40  # about 25 polls in 10 s: no busy loop

    def test_timeout_leaves_late_replies_behind(self):
        clock = Clock()
        got = collect_replies(_site_replies({"a": 0.1, "b": 100.0}, clock), ["a", "b"], 5.0, sleep=clock.sleep,
                              clock=lambda: clock.now)
        assert [r.metadata.reply_to_message_id for r in got] == ["a"]
        assert 5.0 <= clock.now < 5.0 + 1e-6

    def test_no_messages_returns_at_once(self):
        clock = Clock()
        assert collect_replies(_site_replies({}, clock), [], 5.0, sleep=clock.sleep, clock=lambda: clock.now) == []
        assert clock.sleeps == []
