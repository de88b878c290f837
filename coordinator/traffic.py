"""Counts the coordinator's control traffic per worker: a gRPC server interceptor, so the servicer stays thin.

The servicer counts what it streams or receives as payload (updates and aggregates: protocol bytes; the initial
state and whole-replica pulls: state bytes). Everything else a worker's call moves is control traffic, counted
here from the serialized messages: the whole request and reply of the unary calls (Join, Heartbeat, Leave,
WaitRound, AttestBase, ReservePush), the request that opens a PullState or PullAggregate stream, and the reply
that closes a PushUpdate. A refused call is not counted (its error status carries no message), nor are Status
calls, which come from an operator rather than a worker.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Protocol

import grpc

SERVICE_PREFIX = "/lowband.v1.Coordinator/"
UNCOUNTED = {"Status"}
# Single-request calls the server's UnaryRequestGuard (protocols/wire/servicing.py) registers as client streams
# of one message: counted as the unary calls they are.
UNARY = {"Join", "Heartbeat", "Leave", "WaitRound", "AttestBase", "ReservePush"}
OPENING = {"PullState", "PullAggregate"}


class ControlCounter(Protocol):
    def count_control(self, worker_id: str, sent: int, received: int) -> None: ...


class ControlTraffic(grpc.ServerInterceptor):
    def __init__(self, counter: ControlCounter) -> None:
        self.counter = counter

    def intercept_service(self, continuation: Callable[[Any], Any], details: Any) -> Any:
        handler = continuation(details)
        method: str = details.method
        if handler is None or not method.startswith(SERVICE_PREFIX) or method[len(SERVICE_PREFIX):] in UNCOUNTED:
            return handler
        name = method[len(SERVICE_PREFIX):]
        if handler.stream_unary is not None and name in UNARY:
            return grpc.stream_unary_rpc_method_handler(self._guarded_unary(handler.stream_unary),
                                                        handler.request_deserializer, handler.response_serializer)
        if handler.stream_stream is not None and name in OPENING:
            return grpc.stream_stream_rpc_method_handler(self._guarded_opening(handler.stream_stream),
                                                         handler.request_deserializer, handler.response_serializer)
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(self._unary(handler.unary_unary),
                                                       handler.request_deserializer, handler.response_serializer)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(self._opening(handler.unary_stream),
                                                        handler.request_deserializer, handler.response_serializer)
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(self._closing(handler.stream_unary),
                                                        handler.request_deserializer, handler.response_serializer)
        return handler

    def _unary(self, behavior: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
        def counted(request: Any, context: Any) -> Any:
            reply = behavior(request, context)
            # A Join names its worker in the reply (the request may leave the id to the coordinator).
            worker_id = getattr(reply, "worker_id", "") or request.envelope.worker_id
            if reply is not None:
                self.counter.count_control(worker_id, request.ByteSize(), reply.ByteSize())
            return reply

        return counted

    def _opening(self, behavior: Callable[[Any, Any], Iterator[Any]]) -> Callable[[Any, Any], Iterator[Any]]:
        def counted(request: Any, context: Any) -> Iterator[Any]:
            stream = behavior(request, context)
            first = True
            for msg in stream:
                if first:  # the request was accepted: the stream started
                    self.counter.count_control(request.envelope.worker_id, request.ByteSize(), 0)
                    first = False
                yield msg

        return counted

    # The guarded forms read their one request themselves (under the guard's deadline): the stream is passed
    # through, and its first message counted once the call answered.
    def _guarded_unary(self, behavior: Callable[[Iterator[Any], Any], Any]) -> Callable[[Iterator[Any], Any], Any]:
        def counted(requests: Iterator[Any], context: Any) -> Any:
            recorded = _Recorded(requests)
            reply = behavior(recorded, context)
            if reply is not None and recorded.first is not None:
                worker_id = getattr(reply, "worker_id", "") or recorded.first.envelope.worker_id
                self.counter.count_control(worker_id, recorded.first.ByteSize(), reply.ByteSize())
            return reply

        return counted

    def _guarded_opening(self, behavior: Callable[[Iterator[Any], Any], Iterator[Any]]
                         ) -> Callable[[Iterator[Any], Any], Iterator[Any]]:
        def counted(requests: Iterator[Any], context: Any) -> Iterator[Any]:
            recorded = _Recorded(requests)
            first = True
            for msg in behavior(recorded, context):
                if first and recorded.first is not None:
                    self.counter.count_control(recorded.first.envelope.worker_id, recorded.first.ByteSize(), 0)
                    first = False
                yield msg

        return counted

    def _closing(self, behavior: Callable[[Iterator[Any], Any], Any]) -> Callable[[Iterator[Any], Any], Any]:
        def counted(requests: Iterator[Any], context: Any) -> Any:
            sender = _Sender(requests)
            reply = behavior(sender, context)
            if reply is not None and sender.worker_id:
                self.counter.count_control(sender.worker_id, 0, reply.ByteSize())
            return reply

        return counted


class _Recorded:
    """A client stream passed through unchanged, keeping its first message."""

    def __init__(self, inner: Iterator[Any]) -> None:
        self.inner: Iterator[Any] = inner
        self.first: Any = None

    def __iter__(self) -> _Recorded:
        return self

    def __next__(self) -> Any:
        msg = next(self.inner)
        if self.first is None:
            self.first = msg
        return msg


class _Sender:
    """A client stream passed through unchanged, noting the worker its header names."""

    def __init__(self, inner: Iterator[Any]) -> None:
        self.inner, self.worker_id = inner, ""

    def __iter__(self) -> _Sender:
        return self

    def __next__(self) -> Any:
        msg = next(self.inner)
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
