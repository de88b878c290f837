"""Shared by the stalled-stream tests: a client stream that sends (at most) one message and then waits until
the test releases it, and the status code a finished call ended with."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import grpc

STALLED = 20  # calls a test opens that stall


def stalled(release: threading.Event, first: Any = None) -> Iterator[Any]:
    if first is not None:
        yield first
    release.wait(120)  # hang guard: the test releases it


def code_of(future: Any) -> grpc.StatusCode:
    """The status a done call's future ended with (OK when it returned)."""
    try:
        future.result(timeout=0)
    except grpc.RpcError as err:
        return err.code()
    return grpc.StatusCode.OK
