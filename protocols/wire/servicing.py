"""What every gRPC servicer of lowband shares: refusals as gRPC statuses, a byte-counting stream, and the
guards that keep one client from holding the server.

The coordinator's servicer, the rendezvous' and each peer's all answer a `Rejected` (protocols/refusals.py)
with the status its code names, an oversized message or stream (`WireTooLarge`) with RESOURCE_EXHAUSTED,
anything else a malformed message sent them with INVALID_ARGUMENT, and an unexpected exception with INTERNAL
(logged with its traceback), never gRPC's bare UNKNOWN.

Guards (`Slots`, `StreamWatchdog`): a sync gRPC server (the rendezvous', the peers') runs each call on a pool
thread, so a client that opens a stream and stalls holds that thread (the coordinator's asyncio server awaits the
same `Slots` and reads its streams under timeouts instead: protocols/wire/aio_servicing.py). `Slots` bounds how many
calls of one kind run at once (past it: RESOURCE_EXHAUSTED at once, no thread kept; or after a bounded wait, in
turn, where the caller allows one), and `StreamWatchdog` ends, with DEADLINE_EXCEEDED, a client stream that waited
longer than its idle limit for the next message, or ran past its overall deadline.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

import grpc

from protocols.refusals import Code, Rejected
from protocols.wire.messages import BUSY_PREFIXES, GRPC_OPTIONS, WireError, WireTooLarge

log = logging.getLogger(__name__)

STATUS = {
    Code.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    Code.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    Code.FAILED_PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
    Code.ALREADY_EXISTS: grpc.StatusCode.ALREADY_EXISTS,
    Code.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    Code.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Code.DEADLINE_EXCEEDED: grpc.StatusCode.DEADLINE_EXCEEDED,
}


# Servers add to the shared message-size options: no SO_REUSEPORT, so a second server on a port in use fails
# to bind instead of silently sharing it.
SERVER_OPTIONS: list[tuple[str, int]] = [*GRPC_OPTIONS, ("grpc.so_reuseport", 0)]
# How long a call may wait in gRPC core's queue of calls not yet taken by the Python server. Python's sync
# server takes them one at a time, from the one thread that also handles every stream's events, so a burst
# (a round close wakes every worker's pull at once) drains slowly under load; past core's default of 30 s the
# rest were killed, and their clients saw a bare CANCELLED: 417 of 1,000 pulls in the coordinator-scale
# bench (BENCHMARKS.md "Coordinator scale"). Each call's own deadline still bounds its wait.
PENDING_CALL_WAIT_S = 3600
# Core's default bound on that queue: past it, calls are refused at random (RESOURCE_EXHAUSTED).
DEFAULT_MAX_PENDING_CALLS = 1000


def server_options(max_pending_calls: int, pending_wait_s: int = PENDING_CALL_WAIT_S,
                   keepalive_s: tuple[float, float] | None = None) -> list[tuple[str, int]]:
    """SERVER_OPTIONS for a server that may see `max_pending_calls` calls arrive at once: they wait to be taken
    (up to `pending_wait_s`) instead of being killed or refused while the server catches up.

    `keepalive_s` (every, within): while a connection has calls open, ping the client every `every` seconds and
    close the connection, ending its calls, when a ping goes unanswered `within` seconds. A server that counts
    an open call as proof of life (the coordinator's long polls) needs it: a client killed outright closes its
    connection, but one behind a dead link or a frozen machine says nothing, and its calls would stay open."""
    soft = max(DEFAULT_MAX_PENDING_CALLS, max_pending_calls)
    options = [*SERVER_OPTIONS, ("grpc.server_max_unrequested_time_in_server", pending_wait_s),
               ("grpc.server.max_pending_requests", soft), ("grpc.server.max_pending_requests_hard_limit", 3 * soft)]
    if keepalive_s is not None:
        every, within = (max(1, round(s * 1000)) for s in keepalive_s)
        # Core stops pinging after 2 pings with no data between them unless told 0 (no limit): a long poll sends
        # no data while it waits. It waits for a keepalive ping's answer as for any ping, `ping_timeout_ms`
        # (60 s by default), whatever `keepalive_timeout_ms` says.
        options += [("grpc.keepalive_time_ms", every), ("grpc.keepalive_timeout_ms", within),
                    ("grpc.http2.ping_timeout_ms", within), ("grpc.http2.max_pings_without_data", 0)]
    return options


def listen(server: grpc.Server, bind: str, what: str, credentials: grpc.ServerCredentials | None = None) -> int:
    """Bind `server` to `bind` (TLS with `credentials`); the port bound. A port in use (SERVER_OPTIONS: no
    sharing) or an address not this machine's raises one OSError that names `what` and `bind`."""
    try:
        port = server.add_secure_port(bind, credentials) if credentials else server.add_insecure_port(bind)
    except RuntimeError as err:  # grpc's "Failed to bind to address ..."
        port, why = 0, str(err)
    else:
        why = ""
    if port == 0:
        raise OSError(f"cannot listen on {bind} for the {what}: the port is in use, or the address is not one of "
                      f"this machine's{f' ({why})' if why else ''}")
    return port


def server_credentials(cert_chain: bytes, private_key: bytes, client_ca: bytes | None = None) -> grpc.ServerCredentials:
    """TLS for a server; with `client_ca`, mutual TLS: a client must show a certificate that CA signed."""
    return grpc.ssl_server_credentials([(private_key, cert_chain)], root_certificates=client_ca,
                                       require_client_auth=client_ca is not None)


def refusal_status(err: Exception) -> tuple[grpc.StatusCode, str]:
    """The gRPC status and message that answer `err`."""
    if isinstance(err, Rejected):
        return STATUS[err.code], err.message
    if isinstance(err, WireTooLarge):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(err)
    if isinstance(err, WireError):
        return grpc.StatusCode.INVALID_ARGUMENT, f"malformed message: {err}"
    return grpc.StatusCode.INTERNAL, f"internal error ({type(err).__name__}: {err}); nothing of the request was applied"


def abort(context: grpc.ServicerContext, status: grpc.StatusCode, message: str, level: int = logging.WARNING
          ) -> NoReturn:
    """End the call with `status` (logged at `level`)."""
    log.log(level, "rejected: %s", message)
    context.abort(status, message)
    raise AssertionError("unreachable: context.abort raises")


def logged_refusal(err: Exception) -> tuple[grpc.StatusCode, str]:
    """`refusal_status`, logged: an unexpected error (INTERNAL) with its traceback, every refusal as rejected."""
    status, message = refusal_status(err)
    if status is grpc.StatusCode.INTERNAL:
        log.error("internal error answering a call", exc_info=err)
    log.warning("rejected: %s", message)
    return status, message


def refuse(context: grpc.ServicerContext, err: Exception) -> NoReturn:
    """End the call with the status that answers `err` (an unexpected one: INTERNAL, traceback logged)."""
    context.abort(*logged_refusal(err))
    raise AssertionError("unreachable: context.abort raises")


def answered(handler: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap an RPC method so that any exception it lets escape becomes a status that says what went wrong
    (`refuse`), never gRPC's UNKNOWN. The status of a call already ended (aborted, or cancelled by a guard)
    passes through untouched."""

    def call(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return handler(self, request, context)
        except Exception as err:
            if _ended(context):
                raise
            refuse(context, err)

    call.__name__, call.__doc__ = handler.__name__, handler.__doc__
    return call


def _ended(context: grpc.ServicerContext) -> bool:
    # `context.abort` raises a bare Exception after setting the status: that is a deliberate ending.
    state = getattr(context, "_state", None)
    return bool(getattr(state, "aborted", False)) or not context.is_active()


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


class Slots:
    """At most `limit` calls of one kind at a time. One more waits up to `wait_s` (`hold`) for a slot, in turn
    behind those already waiting, and is then refused with RESOURCE_EXHAUSTED "server busy"; with no wait,
    at once. A coroutine waits with `acquire_async`, holding no thread: a freed slot goes to a waiting thread
    first (its call's payload is already buffered), then to the coroutines in the order they came."""

    def __init__(self, what: str, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"{what}: the limit must be >= 1, got {limit}")
        self.what, self.limit = what, limit
        self._cond = threading.Condition()
        self.in_use = 0
        self.waiting = 0  # calls waiting for a slot now, threads and coroutines
        self._threads_waiting = 0
        self._coroutines: deque[_SlotWaiter] = deque()

    @contextmanager
    def hold(self, wait_s: float | None = 0.0) -> Iterator[None]:
        """Hold a slot while inside; `wait_s` None: wait for one however long it takes."""
        self.acquire(wait_s)
        try:
            yield
        finally:
            self.release()

    def busy(self) -> Rejected:
        return Rejected(Code.RESOURCE_EXHAUSTED, f"{BUSY_PREFIXES[0]} too many {self.what} in flight (at most "
                                                 f"{self.limit}); retry later")

    def acquire(self, wait_s: float | None = 0.0) -> None:
        """Take a slot (as `hold` does) that the caller gives back with `release`: for a slot held across calls."""
        with self._cond:
            if (wait_s is None or wait_s > 0) and (self.in_use >= self.limit or self.waiting):
                self.waiting += 1
                self._threads_waiting += 1
                try:  # Condition.notify wakes the longest waiting first
                    self._cond.wait_for(lambda: self.in_use < self.limit, wait_s)
                finally:
                    self.waiting -= 1
                    self._threads_waiting -= 1
            if self.in_use >= self.limit:
                raise self.busy()
            self.in_use += 1

    async def acquire_async(self, wait_s: float | None = 0.0) -> None:
        """`acquire` for a coroutine: it waits on its event loop, not on a thread."""
        with self._cond:
            if self.in_use < self.limit and not self.waiting:
                self.in_use += 1
                return
            if wait_s is not None and wait_s <= 0:
                raise self.busy()
            waiter = _SlotWaiter(asyncio.get_running_loop())
            self._coroutines.append(waiter)
            self.waiting += 1
        try:
            await asyncio.wait_for(asyncio.shield(waiter.granted), wait_s)
        except BaseException as err:  # timed out or cancelled: the slot may have been handed over meanwhile
            with self._cond:
                handed = waiter.handed
                if not handed:
                    self._coroutines.remove(waiter)
            if handed and isinstance(err, asyncio.TimeoutError):
                return  # it came as the wait ended: take it
            if handed:
                self.release()
            if isinstance(err, asyncio.TimeoutError):
                raise self.busy() from None
            raise
        finally:
            with self._cond:
                self.waiting -= 1

    def release(self) -> None:
        with self._cond:
            self.in_use -= 1
            if self._threads_waiting:
                self._cond.notify()
                return
            handed = self._hand_over()
        self._grant(handed)

    def _hand_over(self) -> list[_SlotWaiter]:
        """(Under the lock.) Free slots to the coroutines waiting, in the order they came: each stays in use, now
        the waiter's."""
        handed = []
        while self._coroutines and self.in_use < self.limit:
            waiter = self._coroutines.popleft()
            waiter.handed = True
            self.in_use += 1
            handed.append(waiter)
        return handed

    @staticmethod
    def _grant(handed: list[_SlotWaiter]) -> None:
        for waiter in handed:
            waiter.loop.call_soon_threadsafe(waiter.grant)


class _SlotWaiter:
    """A coroutine waiting in `Slots.acquire_async`: `handed` (under the slots' lock) once a slot is its own."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop, self.handed = loop, False
        self.granted: asyncio.Future[None] = loop.create_future()

    def grant(self) -> None:
        if not self.granted.done():
            self.granted.set_result(None)


class GuardedStream:
    """A client stream under a `StreamWatchdog`: it may wait at most `idle_s` for each message (the first
    included) and, once `set_deadline` was called, must end by then. Time the server spends between two
    reads does not count as the client's."""

    def __init__(self, inner: Iterator[Any], context: grpc.ServicerContext, idle_s: float) -> None:
        self.inner, self.context, self.idle_s = inner, context, idle_s
        self.waiting_since: float | None = None
        self.deadline = float("inf")
        self.ended_by: str | None = None  # set when the watchdog ended the call

    def set_deadline(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds

    def __iter__(self) -> GuardedStream:
        return self

    def __next__(self) -> Any:
        with self.waiting():
            try:
                return next(self.inner)
            except grpc.RpcError:
                if self.ended_by is not None:
                    raise Rejected(Code.DEADLINE_EXCEEDED, self.ended_by) from None
                raise

    @contextmanager
    def waiting(self) -> Iterator[None]:
        """Time inside counts as the client's: a read of its next message."""
        self.waiting_since = time.monotonic()
        try:
            yield
        finally:
            self.waiting_since = None

    def overdue(self, now: float) -> str | None:
        """Why the watchdog must end this stream now, or None."""
        if self.waiting_since is not None and now - self.waiting_since > self.idle_s:
            return idle_message(self.idle_s)
        if now > self.deadline:
            return DEADLINE_MESSAGE
        return None


def idle_message(idle_s: float) -> str:
    """Why a stream whose client kept the server waiting past `idle_s` was ended."""
    return f"the stream sent nothing for {idle_s:g} s (server-side idle limit); call ended"


DEADLINE_MESSAGE = "the stream ran past its server-side deadline; call ended"


class StreamWatchdog:
    """One daemon thread that ends every overdue `GuardedStream` with DEADLINE_EXCEEDED, freeing its thread."""

    def __init__(self, poll_s: float = 0.25) -> None:
        self.poll_s = poll_s
        self._streams: set[GuardedStream] = set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.ended = 0  # streams ended so far (tests and logs)

    @contextmanager
    def guard(self, inner: Iterator[Any], context: grpc.ServicerContext, idle_s: float) -> Iterator[GuardedStream]:
        stream = GuardedStream(inner, context, idle_s)
        with self._lock:
            self._streams.add(stream)
            if self._thread is None:
                self._thread = threading.Thread(target=self._watch, name="stream-watchdog", daemon=True)
                self._thread.start()
        try:
            yield stream
        finally:
            with self._lock:
                self._streams.discard(stream)

    def _watch(self) -> None:
        while True:
            time.sleep(self.poll_s)
            now = time.monotonic()
            with self._lock:
                overdue = [(s, why) for s in self._streams if (why := s.overdue(now)) is not None]
                for stream, _ in overdue:
                    self._streams.discard(stream)
            for stream, why in overdue:
                stream.ended_by = why
                self.ended += 1
                log.warning("ending a stream: %s", why)
                _cancel(stream.context, why)


def _cancel(context: grpc.ServicerContext, why: str) -> None:
    """End the call from outside its handler thread with DEADLINE_EXCEEDED and `why`; the handler's blocked
    read then raises. grpc's public `cancel()` can only say CANCELLED, so the core call is used when present."""
    call: Any = getattr(getattr(context, "_rpc_event", None), "call", None)
    try:
        from grpc._cython import cygrpc

        call.cancel(cygrpc.StatusCode.deadline_exceeded, why)
    except Exception:  # a grpc build without that core call: a plain cancel still frees the thread
        context.cancel()


def request_readers(workers: int) -> int:
    """How many unary calls may be reading their request at once (`UnaryRequestGuard`): at least 8, and one per 8
    workers. A fixed 8 refused as busy hundreds of a 1,000-worker run's heartbeats and long polls, each then retried
    at the cost of another whole call, though a request of ~100 bytes takes no time to arrive. Calls that never
    send theirs still hold at most this many threads, each for the guard's wait."""
    return max(8, workers // 8)


class UnaryRequestGuard:
    """Keeps clients that never finish sending a unary request from holding the server's threads.

    gRPC's sync server takes a pool thread for a unary call first and then waits, with no deadline, for its
    request: forty clients that open a call and send nothing hold every thread (and the concurrency bound),
    starving every honest call. `add` re-registers a service's unary-request methods as client-stream
    handlers (the same bytes on the wire) that read the one request inside a `Slots` (one more waiting
    reader: RESOURCE_EXHAUSTED at once) under a `StreamWatchdog` (a request not there within `wait_s`:
    DEADLINE_EXCEEDED), then call the servicer's method with it."""

    def __init__(self, what: str, readers: int, wait_s: float, watchdog: StreamWatchdog | None = None) -> None:
        self.slots = Slots(f"{what} requests still arriving", readers)
        self.wait_s = wait_s
        self.watchdog = watchdog or StreamWatchdog()

    def add(self, add_to_server: Callable[[Any, Any], None], servicer: Any, server: grpc.Server) -> None:
        """Register `servicer` on `server` through `add_to_server` (a generated add_*Servicer_to_server)."""
        add_guarded(add_to_server, servicer, server, self._guarded)

    def _guarded(self, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        method = handler.unary_stream if handler.response_streaming else handler.unary_unary

        def read(request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Any:
            try:
                with self.slots.hold(), self.watchdog.guard(request_iterator, context, self.wait_s) as stream:
                    request = next(stream, None)
                if request is None:
                    raise Rejected(Code.INVALID_ARGUMENT, "the call carried no request message")
            except Exception as err:
                if _ended(context):
                    raise
                refuse(context, err)
            return method(request, context)

        return as_client_stream(handler, read)


def add_guarded(add_to_server: Callable[[Any, Any], None], servicer: Any, server: Any,
                guarded: Callable[[grpc.RpcMethodHandler], grpc.RpcMethodHandler]) -> None:
    """Register `servicer` on `server` (sync or asyncio) through `add_to_server` (a generated
    add_*Servicer_to_server), each method that takes a single request replaced by `guarded(its handler)`."""
    captured: dict[str, dict[str, grpc.RpcMethodHandler]] = {}

    class Capture:
        def add_generic_rpc_handlers(self, handlers: Any) -> None:
            pass  # the registered handlers below carry the same methods

        def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
            captured[service] = handlers

    add_to_server(servicer, Capture())
    for service, handlers in captured.items():
        replaced = {name: guarded(h) if not h.request_streaming else h for name, h in handlers.items()}
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, replaced),))
        server.add_registered_method_handlers(service, replaced)


def as_client_stream(handler: grpc.RpcMethodHandler, read: Callable[..., Any]) -> grpc.RpcMethodHandler:
    """`read` (given the request stream and the context) as the handler of `handler`'s single-request method: a
    client stream of one message, the same bytes on the wire; its responses serialized as before, or sent as they
    are when already bytes (`serialized_as_is`)."""
    if handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(read, request_deserializer=handler.request_deserializer,
                                                     response_serializer=serialized_as_is(handler.response_serializer))
    return grpc.stream_unary_rpc_method_handler(read, request_deserializer=handler.request_deserializer,
                                                response_serializer=handler.response_serializer)


def serialized_as_is(serialize: Callable[[Any], bytes] | None) -> Callable[[Any], bytes]:
    """A response stream's serializer that sends `bytes` as they are: a message serialized once ahead and shared
    by many calls (a round's aggregate, `serde.EncodedAggregate`), which serializing again per call would copy.
    Messages go through `serialize` as before."""
    if serialize is None:
        raise ValueError("a response stream without a serializer")

    def serialized(msg: Any) -> bytes:
        return msg if isinstance(msg, bytes) else serialize(msg)

    return serialized
