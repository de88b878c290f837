"""Counts the coordinator's control traffic per worker: a gRPC server interceptor, so the servicer stays thin.

The servicer counts what it streams or receives as payload (updates and aggregates: protocol bytes; the initial
state and whole-replica pulls: state bytes). Everything else a worker's call moves is control traffic, counted
here from the serialized messages: the whole request and reply of the unary calls (Join, Heartbeat, Leave,
WaitRound, AttestBase, ReservePush), the request that opens a PullState or PullAggregate stream (counted by the
servicer), and the reply that closes a PushUpdate. A refused call is not counted (its error status carries no
message), nor are Status calls, which come from an operator rather than a worker.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

import grpc
import grpc.aio

SERVICE_PREFIX = "/lowband.v1.Coordinator/"
UNCOUNTED = {"Status"}
# Single-request calls the server's AsyncRequestGuard (protocols/wire/aio_servicing.py) registers as client streams
# of one message: counted as the unary calls they are.
UNARY = {"Join", "Heartbeat", "Leave", "WaitRound", "AttestBase", "ReservePush"}
# The request that opens a PullState or PullAggregate stream is counted by the servicer once the stream started
# (coordinator/servicer.py `_send`): its coroutine writes the stream itself, which an interceptor does not see.

Behavior = Callable[[AsyncIterator[Any], Any], Awaitable[Any]]


class ControlCounter(Protocol):
    def count_control(self, worker_id: str, sent: int, received: int) -> None: ...


class ControlTraffic(grpc.aio.ServerInterceptor):
    def __init__(self, counter: ControlCounter) -> None:
        self.counter = counter

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]], details: Any) -> Any:
        handler = await continuation(details)
        method: str = details.method
        if handler is None or not method.startswith(SERVICE_PREFIX) or handler.stream_unary is None:
            return handler
        name = method[len(SERVICE_PREFIX):]
        if name in UNCOUNTED:
            return handler
        counted = self._unary(handler.stream_unary) if name in UNARY else self._closing(handler.stream_unary)
        return grpc.stream_unary_rpc_method_handler(counted, handler.request_deserializer,
                                                    handler.response_serializer)

    # The guarded unary calls read their one request themselves (under the guard's deadline): the stream is passed
    # through, and its first message counted once the call answered.
    def _unary(self, behavior: Behavior) -> Behavior:
        async def counted(requests: AsyncIterator[Any], context: Any) -> Any:
            recorded = _Recorded(requests)
            reply = await behavior(recorded, context)
            if reply is not None and recorded.first is not None:
                # A Join names its worker in the reply (the request may leave the id to the coordinator).
                worker_id = getattr(reply, "worker_id", "") or recorded.first.envelope.worker_id
                self.counter.count_control(worker_id, recorded.first.ByteSize(), reply.ByteSize())
            return reply

        return counted

    def _closing(self, behavior: Behavior) -> Behavior:
        async def counted(requests: AsyncIterator[Any], context: Any) -> Any:
            sender = _Sender(requests)
            reply = await behavior(sender, context)
            if reply is not None and sender.worker_id:
                self.counter.count_control(sender.worker_id, 0, reply.ByteSize())
            return reply

        return counted


class _Recorded:
    """A client stream passed through unchanged, keeping its first message."""

    def __init__(self, inner: AsyncIterator[Any]) -> None:
        self.inner = inner
        self.first: Any = None

    def __aiter__(self) -> _Recorded:
        return self

    async def __anext__(self) -> Any:
        msg = await anext(self.inner)
        if self.first is None:
            self.first = msg
        return msg


class _Sender:
    """A client stream passed through unchanged, noting the worker its header names."""

    def __init__(self, inner: AsyncIterator[Any]) -> None:
        self.inner, self.worker_id = inner, ""

    def __aiter__(self) -> _Sender:
        return self

    async def __anext__(self) -> Any:
        msg = await anext(self.inner)
        if not self.worker_id and msg.HasField("header"):
            self.worker_id = msg.header.envelope.worker_id
        return msg


TRAFFIC_KEYS = ("protocol_sent", "protocol_received", "control_sent", "control_received", "state_sent",
                "state_received")


def traffic_of(counts: Any) -> dict[str, int]:
    """The six byte counts of a worker (a `Member`, or a mapping with those keys), as a dict."""
    get = counts.get if isinstance(counts, dict) else lambda key, default: getattr(counts, key, default)
    return {key: int(get(key, 0)) for key in TRAFFIC_KEYS}


def traffic_per_worker(rows: list[dict[str, int]]) -> dict[str, float]:
    """The mean of each byte count over the workers (every worker that joined counts, as for the totals)."""
    n = max(len(rows), 1)
    return {key: sum(row.get(key, 0) for row in rows) / n for key in TRAFFIC_KEYS}
