"""How the coordinator's WaitRound coroutines learn that the round or the phase moved.

`CoordinatorState` calls `RoundSignal.fire` (one of its `round_listeners`) from whichever thread moved either, under
its lock, after every change of either. A waiter waits for that alone, with one timer for its whole wait. It used to
look again every second besides, as the threads did: a timer and a task per waiter per second, which at 1,000
workers and 40-s rounds was 40,000 wake-ups a round, a cost growing as the square of the workers (BENCHMARKS.md
"Coordinator scale"). Nothing is missed without it: the check and the start of the wait are one step of the loop,
and `fire` wakes the waiters on the loop, so a move after the check wakes the wait that followed it.

Waiters are woken WAKE_SLICE at a time, each slice a callback of its own on the loop. Every call is served by that one
loop, and when a round closes all its workers' long polls are waiting: woken at once, their answers and the pulls
that follow were one burst of thousands of callbacks, and a heartbeat that came in meanwhile waited behind all of
them. Between slices, what came in meanwhile runs. At 1,000 workers (bench/coordinator_scale.py, the 0.1M model, two
runs each side, with this module's and the state's other changes of that day) the loop's worst lateness went from
2.1 and 2.6 s to 0.7 and 1.5 s (BENCHMARKS.md "Coordinator scale").
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from typing import Protocol

from coordinator.phase import Phase

WAKE_SLICE = 32
COMPACT_SLACK = 64


class RoundView(Protocol):
    phase: Phase
    round: int


class RoundSignal:
    def __init__(self, wake_slice: int = WAKE_SLICE) -> None:
        self.wake_slice = wake_slice
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._live_at_compaction = 0

    def fire(self) -> None:
        """From any thread: wake every waiter waiting when the loop gets to it."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._wake_all)

    def _wake_all(self) -> None:
        """(On the loop.) Every waiter queued now looked at the state before the move (its look and its queueing
        are one step of the loop, and this runs after the move was signalled); a later one looks after it."""
        self._wake(len(self._waiters))

    def _wake(self, count: int) -> None:
        """(On the loop.) Wake the `count` oldest waiters, a slice now and the rest in later callbacks. (If a
        compaction moved newer waiters up meanwhile, some of those are woken instead: they look again and wait.)"""
        count = min(count, len(self._waiters))
        for _ in range(min(count, self.wake_slice)):
            waiter = self._waiters.popleft()
            if not waiter.done():  # a wait that timed out is cancelled: skipped
                waiter.set_result(None)
        if count > self.wake_slice:
            self._loop.call_soon(self._wake, count - self.wake_slice)  # type: ignore[union-attr]

    def _queue(self, waiter: asyncio.Future[None]) -> None:
        if len(self._waiters) >= 2 * self._live_at_compaction + COMPACT_SLACK:  # mostly waits that timed out
            self._waiters = deque(w for w in self._waiters if not w.done())
            self._live_at_compaction = len(self._waiters)
        self._waiters.append(waiter)

    async def wait_past(self, state: RoundView, after_round: int, timeout: float) -> None:
        """Return once the round is past `after_round` or the run finished (read without the state's lock: the
        caller reads the answer under it), or after `timeout`."""
        loop = self._loop = asyncio.get_running_loop()
        deadline = time.monotonic() + timeout
        while not (state.phase is Phase.FINISHED or (state.phase is Phase.TRAINING and state.round > after_round)):
            left = deadline - time.monotonic()
            if left <= 0:
                return
            waiter = loop.create_future()
            self._queue(waiter)
            with contextlib.suppress(TimeoutError):  # wait_for cancels the waiter: a wake skips it
                await asyncio.wait_for(waiter, left)
