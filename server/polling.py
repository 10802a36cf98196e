"""Waiting for the sites' replies without Flower's fixed 3 s poll.

Flower 1.41's ``Grid.send_and_receive`` (the deployment/simulation grid over HTTP) pushes the
round's messages and then asks the SuperLink for replies every 3 s, twice a round (train and
evaluate): on a round whose training takes a few seconds that sleep is most of the round.
:class:`PollingGrid` wraps the grid the ServerApp is given and does the same with Flower's own
``push_messages`` / ``pull_messages``, asking again after a short interval that grows while
nothing arrives (0.02 s, x1.25 per empty poll, at most 0.5 s: some 30 requests in the first
10 s) and drops back when a reply comes. It sleeps between polls (no busy-waiting) and keeps the round timeout: replies not in by then are
left behind, as Flower does.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

#: First and longest wait between two polls for replies (seconds), and the growth per empty poll.
POLL_MIN_S, POLL_MAX_S, POLL_GROWTH = 0.02, 0.5, 1.25


def collect_replies(
    pull: Callable[[set[str]], Iterable[Message]],
    message_ids: Iterable[str],
    timeout: float | None,
    *,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> list[Message]:
    """Pull replies to ``message_ids`` until all are in or ``timeout`` seconds passed (None: no limit)."""
    waiting = set(message_ids)
    end = None if timeout is None else clock() + timeout
    interval = POLL_MIN_S
    replies: list[Message] = []
    while waiting:
        got = list(pull(set(waiting)))
        replies.extend(got)
        waiting.difference_update(m.metadata.reply_to_message_id for m in got)
        if not waiting:
            break
        if got:  # the others tend to follow soon
            interval = POLL_MIN_S
        wait = interval
        if end is not None:
            left = end - clock()
            if left <= 0:
                break
            wait = min(wait, left)
        sleep(wait)
        interval = min(POLL_MAX_S, interval * POLL_GROWTH)
    return replies


class PollingGrid(Grid):
    """The ServerApp's grid with :func:`collect_replies` in place of Flower's 3 s poll; all else delegated."""

    def __init__(self, inner: Grid) -> None:
        self._inner = inner

    def set_run(self, run: Any) -> None:
        self._inner.set_run(run)

    @property
    def run(self) -> Any:
        return self._inner.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return self._inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self._inner.get_node_ids()

    def get_nodes(self) -> Iterable[Any]:
        return self._inner.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._inner.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        ids = list(self._inner.push_messages(messages))
        return collect_replies(self._inner.pull_messages, ids, timeout)

    def __getattr__(self, name: str) -> Any:  # anything else the wrapped grid offers (e.g. close)
        return getattr(self._inner, name)
