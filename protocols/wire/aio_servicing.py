"""What the coordinator's asyncio gRPC server adds to `servicing` (coordinator/server.py).

The synchronous server serves each open call on a thread of its own: at a thousand workers, a thousand threads
waiting in long polls, whose wake-ups and stacks were most of what a round's cost and the coordinator's memory grew
by per worker (BENCHMARKS.md "Where the super-linear part of a round goes"). On `grpc.aio` an open call is a
coroutine on one event loop, and threads are only where work is done: the same refusals (`refusal_status`), the same
bounds (`Slots`, whose `acquire_async` waits without a thread) and the same stream guards, as awaits with timeouts
instead of a watchdog thread:
- `GuardedReader`: a client stream whose every message must come within its idle limit, the stream as a whole by
  its deadline once set; a thread reads it as an iterator (`read_push` on a push thread), each message awaited on
  the loop.
- `send_within`: a response message the client must take within the idle limit.
- `AsyncRequestGuard`: a unary call's one request must arrive within a wait, at most so many waiting at once.
- `LoopThread`: the event loop, on a thread of its own, for callers that are not coroutines.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import grpc
import grpc.aio

from protocols.refusals import Code, Rejected
from protocols.wire.servicing import (
    DEADLINE_MESSAGE,
    Slots,
    add_guarded,
    as_client_stream,
    idle_message,
    logged_refusal,
)

log = logging.getLogger(__name__)
T = TypeVar("T")


class LoopThread:
    """An asyncio event loop running on a daemon thread of its own."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run `coro` on the loop and wait for its result (from any thread but the loop's)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)
        if not self.thread.is_alive():
            self.loop.close()


async def refuse_async(context: grpc.aio.ServicerContext, err: Exception) -> None:
    """End the call with the status that answers `err` (an unexpected one: INTERNAL, traceback logged)."""
    await context.abort(*logged_refusal(err))


def answered_async(handler: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """`servicing.answered` for a coroutine handler: any exception it lets escape becomes the status that says
    what went wrong, never gRPC's UNKNOWN; a call already aborted passes through."""

    async def call(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await handler(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as err:
            await refuse_async(context, err)

    call.__name__, call.__doc__ = handler.__name__, handler.__doc__
    return call


def _ending(why: str) -> Rejected:
    log.warning("ending a stream: %s", why)
    return Rejected(Code.DEADLINE_EXCEEDED, why)


# How much longer than its idle limit a thread waits for a read the loop should have ended.
LOOP_GONE_S = 30.0


class GuardedReader:
    """A client stream's messages, each within `idle_s` of being asked for and, once `set_deadline` was called,
    all of them by then; past either, DEADLINE_EXCEEDED (`Rejected`). `nbytes` counts the serialized bytes read.

    Read with `await next_message()` on the loop, or as a plain iterator from another thread (each message
    awaited on the loop): time the reader spends between two reads is not the client's."""

    _END = object()

    def __init__(self, messages: AsyncIterator[Any], loop: asyncio.AbstractEventLoop, idle_s: float) -> None:
        self.messages, self.loop, self.idle_s = messages, loop, idle_s
        self.deadline = float("inf")
        self.nbytes = 0

    def set_deadline(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds

    async def next_message(self) -> Any:
        """The next message, or `GuardedReader._END` when the client finished its stream."""
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise _ending(DEADLINE_MESSAGE)
        try:
            # Waited in this task: `asyncio.wait_for` would run the read as a task of its own, one more task and
            # one more pass of the loop per message, behind everything else the loop has queued.
            async with asyncio.timeout(min(self.idle_s, left)):
                msg = await anext(self.messages)
        except StopAsyncIteration:
            return self._END
        except TimeoutError:
            raise _ending(DEADLINE_MESSAGE if time.monotonic() >= self.deadline else idle_message(self.idle_s)
                          ) from None
        self.nbytes += msg.ByteSize()
        return msg

    def __iter__(self) -> GuardedReader:
        return self

    def __next__(self) -> Any:
        # Bounded: each read ends within the idle limit while the loop runs; one stopped under it ends the reader.
        msg = asyncio.run_coroutine_threadsafe(self.next_message(), self.loop).result(self.idle_s + LOOP_GONE_S)
        if msg is self._END:
            raise StopIteration
        return msg


async def send_within(context: grpc.aio.ServicerContext, msg: Any, idle_s: float) -> None:
    """Write one response message, which the client must take within `idle_s` (flow control holds a write while
    the client does not read): past it, DEADLINE_EXCEEDED."""
    try:
        async with asyncio.timeout(idle_s):  # in this task, not one of its own (GuardedReader.next_message)
            await context.write(msg)
    except TimeoutError:
        raise _ending(idle_message(idle_s)) from None


class AsyncRequestGuard:
    """Reads a unary call's one request itself, under a bound: at most `readers` calls whose request has not come
    yet (one more: RESOURCE_EXHAUSTED at once), each ended with DEADLINE_EXCEEDED when its request is not there
    within `wait_s`. `add` re-registers a service's unary-request methods as client streams of one message (the
    same bytes on the wire) that read it so, then call the servicer's coroutine with it. Without it a client could
    open calls that never send their request, each held until the concurrency bound refuses everyone."""

    def __init__(self, what: str, readers: int, wait_s: float) -> None:
        self.slots = Slots(f"{what} requests still arriving", readers)
        self.wait_s = wait_s

    def add(self, add_to_server: Callable[[Any, Any], None], servicer: Any, server: grpc.aio.Server) -> None:
        """Register `servicer` on `server` through `add_to_server` (a generated add_*Servicer_to_server)."""
        add_guarded(add_to_server, servicer, server, self._guarded)

    def _guarded(self, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        method = handler.unary_stream if handler.response_streaming else handler.unary_unary

        async def read(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
            try:
                with self.slots.hold():
                    async with asyncio.timeout(self.wait_s):  # in this task (GuardedReader.next_message)
                        request = await anext(requests, None)
                if request is None:
                    raise Rejected(Code.INVALID_ARGUMENT, "the call carried no request message")
            except TimeoutError:
                await refuse_async(context, _ending(idle_message(self.wait_s)))
            except Exception as err:
                await refuse_async(context, err)
            return await method(request, context)

        return as_client_stream(handler, read)
