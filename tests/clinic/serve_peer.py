"""Helpers for the listener tests: a free port, an in-process listener, a sending modality."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pydicom
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def running(scorer, out: Path, *, idle_worker: bool = False, **kwargs) -> Iterator:
    """A ``clinic.serve.Listener`` on a loopback port (``.port``), calling AE MODALITY allowed, stopped on exit.

    ``idle_worker``: the worker stops at once, so received images stay queued in the spool folder.
    """
    from clinic.serve import Listener

    kwargs.setdefault("calling_aets", ["MODALITY"])
    node = Listener(scorer, ae_title="FEDXRAY", out=out, state=None, **kwargs)
    if idle_worker:
        node.jobs.put(None)
    node.port = free_port()
    node.start("127.0.0.1", node.port)
    try:
        yield node
    finally:
        node.stop(timeout=30)


def associate(port: int, datasets: list[pydicom.Dataset] = (), *, calling: str = "MODALITY") -> Association:
    """An association from a modality that can send ``datasets`` (and C-ECHO)."""
    ae = AE(calling)
    ae.add_requested_context(Verification)
    for ds in datasets:
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    return ae.associate("127.0.0.1", port, ae_title="FEDXRAY")


def store(port: int, ds: pydicom.Dataset) -> pydicom.Dataset:
    """C-STORE one data set in its own association; the response status data set (empty if none came)."""
    assoc = associate(port, [ds])
    assert assoc.is_established, "the listener refused the association"
    try:
        return assoc.send_c_store(ds)
    finally:
        if assoc.is_established:
            assoc.release()


def echo(port: int) -> int | None:
    assoc = associate(port)
    if not assoc.is_established:
        return None
    try:
        status = assoc.send_c_echo()
        return int(status.Status) if status else None
    finally:
        assoc.release()
