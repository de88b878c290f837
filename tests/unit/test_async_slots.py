"""protocols/wire/servicing.py `Slots.acquire_async` and protocols/wire/aio_servicing.py `GuardedReader`: what the
coordinator's coroutines wait on, without a thread each."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator

import pytest

from protocols.refusals import Code, Rejected
from protocols.wire.aio_servicing import GuardedReader
from protocols.wire.servicing import Slots


def test_waiting_coroutines_get_freed_slots_in_the_order_they_came() -> None:
    async def scenario() -> list[int]:
        slots = Slots("pulls", 1)
        await slots.acquire_async(0.0)
        order: list[int] = []

        async def wait(k: int) -> None:
            await slots.acquire_async(5.0)
            order.append(k)
            slots.release()

        waiters = [asyncio.create_task(wait(k)) for k in range(5)]
        await asyncio.sleep(0.05)
        assert slots.waiting == 5 and slots.in_use == 1
        slots.release()
        await asyncio.gather(*waiters)
        assert slots.in_use == 0 and slots.waiting == 0
        return order

    assert asyncio.run(scenario()) == [0, 1, 2, 3, 4]


def test_a_coroutine_past_its_wait_is_refused_busy_and_gives_up_its_place() -> None:
    async def scenario() -> None:
        slots = Slots("pushes being received", 1)
        await slots.acquire_async(0.0)
        with pytest.raises(Rejected) as busy:
            await slots.acquire_async(0.0)  # no wait: at once
        assert busy.value.code is Code.RESOURCE_EXHAUSTED and "server busy" in busy.value.message
        with pytest.raises(Rejected):
            await slots.acquire_async(0.05)
        assert slots.waiting == 0
        later = asyncio.create_task(slots.acquire_async(5.0))
        await asyncio.sleep(0.01)
        slots.release()  # to the one still waiting, not to the one that gave up
        await later
        assert slots.in_use == 1 and slots.waiting == 0

    asyncio.run(scenario())


def test_a_cancelled_waiter_handed_a_slot_gives_it_back() -> None:
    async def scenario() -> None:
        slots = Slots("pulls", 1)
        await slots.acquire_async(0.0)
        waiter = asyncio.create_task(slots.acquire_async(5.0))
        await asyncio.sleep(0.01)
        slots.release()  # handed to the waiter, whose grant is still on its way
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert slots.in_use == 0 and slots.waiting == 0

    asyncio.run(scenario())


def test_a_waiting_thread_goes_before_the_coroutines() -> None:
    """A thread waits for a slot only with its call's payload already buffered (an unreserved push)."""
    slots = Slots("pushes being received", 1)
    slots.acquire(0.0)
    got: list[str] = []

    def thread_waits() -> None:
        slots.acquire(5.0)
        got.append("thread")

    async def scenario() -> None:
        coroutine = asyncio.create_task(slots.acquire_async(5.0))
        await asyncio.sleep(0.05)
        thread = threading.Thread(target=thread_waits)
        thread.start()
        while slots.waiting < 2:
            await asyncio.sleep(0.01)
        slots.release()
        await asyncio.to_thread(thread.join, 5.0)
        assert got == ["thread"] and not coroutine.done()
        slots.release()
        await coroutine
        got.append("coroutine")

    asyncio.run(scenario())
    assert got == ["thread", "coroutine"] and slots.in_use == 1


def test_two_hundred_waiting_coroutines_start_no_thread() -> None:
    async def scenario() -> None:
        slots = Slots("pulls", 1)
        await slots.acquire_async(0.0)
        before = threading.active_count()
        waiters = [asyncio.create_task(slots.acquire_async(5.0)) for _ in range(200)]
        await asyncio.sleep(0.05)
        assert slots.waiting == 200 and threading.active_count() == before
        for _ in range(200):
            slots.release()
            await asyncio.sleep(0)
        await asyncio.gather(*waiters)
        assert slots.in_use == 1

    asyncio.run(scenario())


async def _stream(gaps_s: list[float]) -> AsyncIterator[bytes]:
    class Message(bytes):
        def ByteSize(self) -> int:  # protobuf's name
            return len(self)

    for gap in gaps_s:
        await asyncio.sleep(gap)
        yield Message(b"abc")


def test_a_stream_idle_past_its_limit_is_ended() -> None:
    async def scenario() -> None:
        reader = GuardedReader(_stream([0.0, 0.0, 1.0]), asyncio.get_running_loop(), idle_s=0.2)
        await reader.next_message()
        await reader.next_message()
        with pytest.raises(Rejected) as ended:
            await reader.next_message()
        assert ended.value.code is Code.DEADLINE_EXCEEDED and "sent nothing for 0.2 s" in ended.value.message
        assert reader.nbytes == 6

    asyncio.run(scenario())


def test_a_stream_past_its_deadline_is_ended_though_each_message_came_in_time() -> None:
    async def scenario() -> None:
        reader = GuardedReader(_stream([0.1] * 20), asyncio.get_running_loop(), idle_s=1.0)
        reader.set_deadline(0.35)
        with pytest.raises(Rejected) as ended:
            for _ in range(20):
                await reader.next_message()
        assert ended.value.code is Code.DEADLINE_EXCEEDED and "past its server-side deadline" in ended.value.message

    asyncio.run(scenario())


def test_a_thread_reads_the_stream_as_an_iterator() -> None:
    async def scenario() -> list[bytes]:
        reader = GuardedReader(_stream([0.0, 0.01, 0.0]), asyncio.get_running_loop(), idle_s=1.0)
        return await asyncio.to_thread(list, reader)

    assert asyncio.run(scenario()) == [b"abc"] * 3


def test_reading_a_stream_on_the_loop_starts_no_task_per_message() -> None:
    """Each read is awaited in the reader's own task: a task per message (as `asyncio.wait_for` would start) is one
    more pass of the event loop each, behind everything else queued on it."""
    started: list[object] = []

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        loop.set_task_factory(lambda lp, coro: started.append(coro) or asyncio.Task(coro, loop=lp))
        reader = GuardedReader(_stream([0.0] * 50), loop, idle_s=1.0)
        while await reader.next_message() is not GuardedReader._END:
            pass
        loop.set_task_factory(None)
        assert reader.nbytes == 150

    asyncio.run(scenario())
    assert started == []
