"""The round's long polls (`CoordinatorState.wait_for_round`) are woken when the round or the phase moves, not
at every fold: with every worker that already pushed waiting for the close, a wakeup per fold made N^2/2
wakeups a round, each taking the state lock (coordinator/state.py `_wake_waiters`)."""

from __future__ import annotations

import asyncio
import threading
import time

import torch

from compression.payload import dense
from coordinator.round_signal import RoundSignal
from coordinator.state import CoordinatorState, Phase
from protocols.base import Update
from protocols.config import PROTOCOL_VERSION
from protocols.registry import build_protocol
from tests.conftest import tiny_config


class CountingCondition(threading.Condition):
    """A Condition that counts the times its waiters returned from `wait` (woken, or timed out after 1 s)."""

    def __init__(self) -> None:
        super().__init__()
        self.wakeups = 0

    def wait(self, timeout: float | None = None) -> bool:
        woken = super().wait(timeout)
        self.wakeups += 1  # under the lock: wait returns holding it
        return woken


def test_folds_that_do_not_close_the_round_wake_no_waiter_and_the_close_wakes_them_all() -> None:
    workers = 6
    cfg = tiny_config(cluster={"workers": workers, "min_workers": workers, "round_deadline_s": 1000.0,
                               "heartbeat_timeout_s": 1000.0})
    state = CoordinatorState(cfg, build_protocol(cfg), clock=time.monotonic)
    ids = [state.join("host", "", PROTOCOL_VERSION).worker_id for _ in range(workers)]
    state.offer_initial_state(ids[0], "", {"w": dense(torch.ones(3, 2))})
    assert state.phase is Phase.TRAINING and state.round == 0
    counting = CountingCondition()
    state._cond = counting  # nobody holds or waits on the old one now
    returned: list[int] = []

    def wait() -> None:
        returned.append(state.wait_for_round(0, 30.0)[0])

    waiters = [threading.Thread(target=wait) for _ in range(workers - 1)]
    for thread in waiters:
        thread.start()
    deadline = time.monotonic() + 10
    while len(counting._waiters) < workers - 1 and time.monotonic() < deadline:  # type: ignore[attr-defined]
        time.sleep(0.01)
    for worker in ids[:-1]:  # folds that leave the round open: no waiter needs to look
        state.submit(worker, "", 0, Update({"w": dense(torch.full((3, 2), 0.1))}), {"tokens": 1.0}, 10)
        time.sleep(0.05)  # time for any waiter woken to take the lock, look, and wait again
    assert state.round == 0 and counting.wakeups <= workers - 1  # at most the 1 s re-looks, if the test was slow
    woken_before_close = counting.wakeups
    state.submit(ids[-1], "", 0, Update({"w": dense(torch.full((3, 2), 0.1))}), {"tokens": 1.0}, 10)
    for thread in waiters:
        thread.join(10)
    assert state.round == 1 and returned == [1] * (workers - 1)
    assert counting.wakeups - woken_before_close >= workers - 1  # the close woke every waiter


class LookCountingState:
    """What `RoundSignal.wait_past` reads of the state, counting its looks (one read of `round` per look while
    training)."""

    def __init__(self) -> None:
        self.phase = Phase.TRAINING
        self._round = 0
        self.looks = 0

    @property
    def round(self) -> int:
        self.looks += 1
        return self._round

    def move(self) -> None:
        self._round += 1


def test_a_round_waiter_looks_again_only_when_the_round_moved_or_its_wait_ended() -> None:
    """At 1,000 workers a look every second per waiter was 40,000 wake-ups a 40-s round: it waits for the signal
    alone now, with one timer for its whole wait."""
    state, signal = LookCountingState(), RoundSignal()
    started = time.monotonic()
    asyncio.run(signal.wait_past(state, 0, 2.5))  # type: ignore[arg-type]
    assert time.monotonic() - started >= 2.4  # nothing moved: it waited out its time
    assert state.looks == 2  # on entry and at its end, none in between (a look a second made it 4)


def test_a_round_waiter_is_woken_by_a_move_made_on_another_thread() -> None:
    state, signal = LookCountingState(), RoundSignal()

    def move_later() -> None:
        time.sleep(0.3)
        state.move()  # as the state does under its lock: the change first, then the listeners
        signal.fire()

    async def wait() -> float:
        mover = threading.Thread(target=move_later)
        mover.start()
        started = time.monotonic()
        await signal.wait_past(state, 0, 60.0)  # type: ignore[arg-type]
        mover.join()
        return time.monotonic() - started

    assert asyncio.run(wait()) < 30.0  # returned on the move, long before its 60 s
    assert state._round == 1 and state.looks == 2


def test_waiters_are_woken_a_slice_at_a_time_and_what_came_meanwhile_runs_between_slices() -> None:
    """At a round's close every worker's long poll is waiting; woken at once they were one burst of callbacks on the
    loop that serves every call, and a heartbeat that came in meanwhile waited behind all of them."""
    state, signal = LookCountingState(), RoundSignal(wake_slice=8)
    order: list[str] = []

    async def waiter(i: int) -> None:
        await signal.wait_past(state, 0, 60.0)  # type: ignore[arg-type]
        if not order:  # a heartbeat comes in as the first answer goes out
            asyncio.get_running_loop().call_soon(order.append, "heartbeat")
        order.append(f"w{i}")

    async def run() -> None:
        waiters = [asyncio.create_task(waiter(i)) for i in range(40)]
        await asyncio.sleep(0.05)  # all 40 waiting
        state.move()
        signal.fire()
        await asyncio.wait_for(asyncio.gather(*waiters), 30)

    asyncio.run(run())
    assert sorted(order) == sorted(["heartbeat"] + [f"w{i}" for i in range(40)])  # every waiter woke, once
    assert order.index("heartbeat") == 8  # right after the first slice, not behind all 40 (woken at once: 40)
    assert [w for w in order if w != "heartbeat"] == [f"w{i}" for i in range(40)]  # in the order they came


def test_waits_that_timed_out_do_not_pile_up_in_the_signal() -> None:
    state, signal = LookCountingState(), RoundSignal()

    async def run() -> int:
        for _ in range(500):
            await signal.wait_past(state, 0, 0.0001)  # type: ignore[arg-type]
        return len(signal._waiters)

    assert asyncio.run(run()) <= 2 * 64 + 1
