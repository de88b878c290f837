"""What every gRPC servicer of lowband shares: refusals as gRPC statuses, and a byte-counting stream.

The coordinator's servicer, the rendezvous' and each peer's all answer a `Rejected` (protocols/refusals.py)
with the status its code names, and anything else a malformed message sent them with INVALID_ARGUMENT.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any, NoReturn

import grpc

from protocols.refusals import Code, Rejected

log = logging.getLogger(__name__)

STATUS = {
    Code.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    Code.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    Code.FAILED_PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
    Code.ALREADY_EXISTS: grpc.StatusCode.ALREADY_EXISTS,
    Code.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    Code.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
}


def refusal_status(err: Exception) -> tuple[grpc.StatusCode, str]:
    """The gRPC status and message that answer `err`."""
    if isinstance(err, Rejected):
        return STATUS[err.code], err.message
    return grpc.StatusCode.INVALID_ARGUMENT, f"malformed message: {err}"


def abort(context: grpc.ServicerContext, status: grpc.StatusCode, message: str, level: int = logging.WARNING
          ) -> NoReturn:
    """End the call with `status` (logged at `level`)."""
    log.log(level, "rejected: %s", message)
    context.abort(status, message)
    raise AssertionError("unreachable: context.abort raises")


def refuse(context: grpc.ServicerContext, err: Exception) -> NoReturn:
    """End the call with the status that answers `err`."""
    abort(context, *refusal_status(err))


class CountingIterator:
    """Counts the serialized bytes of every message a client stream delivers."""

    def __init__(self, inner: Iterator[Any]) -> None:
        self.inner = inner
        self.nbytes = 0

    def __iter__(self) -> CountingIterator:
        return self

    def __next__(self) -> Any:
        msg = next(self.inner)
        self.nbytes += msg.ByteSize()
        return msg
