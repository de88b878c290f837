"""Why an aggregator refused a request. The gRPC servicer maps `code` onto a gRPC status code; the
in-process transport sees the `Rejected` itself."""

from __future__ import annotations

from enum import Enum


class Code(Enum):
    INVALID_ARGUMENT = "INVALID_ARGUMENT"  # malformed update: shape, dtype, NaN/Inf, unknown tensor name
    NOT_FOUND = "NOT_FOUND"  # unknown worker id
    FAILED_PRECONDITION = "FAILED_PRECONDITION"  # stale round, wrong run, no state yet, run finished
    ALREADY_EXISTS = "ALREADY_EXISTS"  # second update for the same round, second initial state
    UNAUTHENTICATED = "UNAUTHENTICATED"  # bad token
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"  # oversized message or stream, too many calls in flight
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"  # a stream whose client went quiet past the server's deadline


class Rejected(Exception):
    """A request the aggregator refused; nothing from it was applied."""

    def __init__(self, code: Code, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def is_stale(err: Rejected) -> bool:
    """The refusal of an update whose round already closed (the sender was too slow)."""
    return err.code is Code.FAILED_PRECONDITION and err.message.startswith("stale round")


def is_early(err: Rejected) -> bool:
    """The refusal of an update for a round that is not open yet (an overlapping sender ran ahead)."""
    return err.code is Code.FAILED_PRECONDITION and err.message.startswith("early round")
