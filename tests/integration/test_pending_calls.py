"""A burst of calls the server cannot take at once (a round close wakes every worker's pull together) waits
in gRPC core's queue of calls not yet taken by the Python server. Core kills a call that waited there past
`grpc.server_max_unrequested_time_in_server` (30 s by default), and its client sees a bare CANCELLED: in the
1,000-worker coordinator-scale bench that was 417 of 1,000 pulls, each ending its worker.

These tests stop a real loopback server from taking calls (they hold its serving thread off the lock it takes
for each new call), send a burst, and let it go: with a short wait the burst is killed; with
a longer wait it is served, and `CoordinatorClient` retries a server-side CANCELLED while treating its
own cancels and its closed channel as final."""

from __future__ import annotations

import threading
import time
from concurrent import futures
from typing import Any

import grpc
import pytest

from protocols.wire.servicing import server_options
from worker.client import CoordinatorClient, transient

METHOD = "/lowband.test.Echo/Call"
BURST = 6
HELD_S = 2.5


def _echo(request: bytes, context: grpc.ServicerContext) -> bytes:
    return request


class EchoServer:
    """A real gRPC server on loopback whose Python side can be kept from taking new calls."""

    def __init__(self, options: list[tuple[str, int]], handler: Any = _echo) -> None:
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=options)
        rpc = grpc.unary_unary_rpc_method_handler(handler)
        self.server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("lowband.test.Echo",
                                                                                   {"Call": rpc})])
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def held(self) -> Any:
        """The lock grpc's serving thread takes before it asks core for the next call (private to grpc)."""
        return self.server._state.lock  # type: ignore[attr-defined]

    def stop(self) -> None:
        self.server.stop(0).wait()


def _burst(port: int, held: Any, wait_s: float = HELD_S) -> list[str]:
    """BURST calls sent while the server takes none for `wait_s`: each call's status code name."""
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    call = channel.unary_unary(METHOD)
    call(b"warm", timeout=10.0)  # connected, and the serving thread idle
    codes: list[str] = []

    def one(i: int) -> None:
        try:
            call(bytes([i]), timeout=30.0)
            codes.append("OK")
        except grpc.RpcError as err:
            codes.append(err.code().name)

    with held:
        threads = [threading.Thread(target=one, args=(i,)) for i in range(BURST)]
        for t in threads:
            t.start()
        time.sleep(wait_s)
    for t in threads:
        t.join(30.0)
    channel.close()
    return codes


def test_calls_waiting_past_the_servers_pending_wait_are_killed() -> None:
    """The failure itself, and that `server_options` sets the wait core applies (at core's default of 30 s
    these calls would all be served): held back 2.5 s against a 1 s wait, they are killed, seen as CANCELLED."""
    server = EchoServer(server_options(max_pending_calls=BURST, pending_wait_s=1))
    try:
        codes = _burst(server.port, server.held())
    finally:
        server.stop()
    assert codes.count("CANCELLED") >= BURST - 2, codes  # the one or two already taken may get through


def test_a_held_back_burst_within_the_pending_wait_is_served() -> None:
    server = EchoServer(server_options(max_pending_calls=BURST, pending_wait_s=10))
    try:
        codes = _burst(server.port, server.held())
    finally:
        server.stop()
    assert codes == ["OK"] * BURST


def test_client_retries_a_call_the_server_side_cancelled() -> None:
    """A CANCELLED that did not come from this client is retried, and the retry is served."""
    server = EchoServer(server_options(max_pending_calls=BURST, pending_wait_s=1))
    client = CoordinatorClient(f"127.0.0.1:{server.port}", retry_for_s=30.0)
    call = client.channel.unary_unary(METHOD)
    call(b"warm", timeout=10.0)
    results: list[Any] = []
    try:
        with server.held():
            threads = [threading.Thread(target=lambda i=i: results.append(client._call(
                lambda: call(bytes([i]), timeout=30.0)))) for i in range(BURST)]
            for t in threads:
                t.start()
            time.sleep(HELD_S)
        for t in threads:
            t.join(30.0)
    finally:
        client.close()
        server.stop()
    assert sorted(results) == [bytes([i]) for i in range(BURST)]
    assert client.retries >= BURST - 2  # they were cancelled first, then retried
    assert client.reconnects == 0  # a call dropped in the queue is no sign of a restart: nothing pushed again


def _error_of(fn: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        fn()
    return info.value


def test_own_cancels_are_final_and_server_cancels_are_not() -> None:
    def cancelling(request: bytes, context: grpc.ServicerContext) -> bytes:
        context.cancel()
        return request

    server = EchoServer(server_options(1), cancelling)
    slow = EchoServer(server_options(1), lambda request, context: (time.sleep(2.0), request)[1])
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    slow_channel = grpc.insecure_channel(f"127.0.0.1:{slow.port}")
    try:
        by_server = _error_of(lambda: channel.unary_unary(METHOD)(b"x", timeout=10.0))
        future = slow_channel.unary_unary(METHOD).future(b"x", timeout=10.0)
        time.sleep(0.2)
        future.cancel()
        by_us = future  # a cancelled future's result() raises FutureCancelledError; the call is the RpcError
        assert isinstance(by_us, grpc.RpcError)
        in_flight = slow_channel.unary_unary(METHOD).future(b"x", timeout=10.0)
        time.sleep(0.2)
        slow_channel.close()
        closed = _error_of(in_flight.result)
    finally:
        channel.close()
        server.stop()
        slow.stop()
    assert [e.code() for e in (by_server, by_us, closed)] == [grpc.StatusCode.CANCELLED] * 3
    assert (transient(by_server), transient(by_us), transient(closed)) == (True, False, False)
