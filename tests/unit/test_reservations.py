"""coordinator/reservations.py: a slot kept per worker until its push takes it or it lapses."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

import pytest

from coordinator.reservations import Reservations
from protocols.wire.servicing import Slots


def reserve(kept: Reservations, worker_id: str, wait_s: float) -> bool:
    """A ReservePush's reservation, awaited on an event loop of its own as the server's coroutine awaits it."""
    return asyncio.run(kept.reserve(worker_id, wait_s))


def test_a_reservation_keeps_a_slot_until_its_push_takes_it() -> None:
    slots = Slots("pushes", 2)
    kept = Reservations(slots, hold_s=60.0)
    assert reserve(kept, "w1", wait_s=0.0) and slots.in_use == 1
    assert reserve(kept, "w1", wait_s=0.0) and slots.in_use == 1  # one per worker: kept again, not twice
    assert kept.take("w1") and kept.held() == 0
    assert slots.in_use == 1  # now the push's, until it releases it
    assert not kept.take("w1")  # taken once
    slots.release()
    assert slots.in_use == 0


def test_a_reservation_not_taken_in_time_lapses_and_frees_its_slot() -> None:
    slots = Slots("pushes", 1)
    kept = Reservations(slots, hold_s=0.1)
    assert reserve(kept, "w1", wait_s=0.0)
    assert not reserve(kept, "w2", wait_s=0.0)  # the only slot is w1's
    assert reserve(kept, "w2", wait_s=5.0)  # w1's lapses within the wait
    assert kept.lapsed == 1 and not kept.take("w1") and kept.take("w2")
    slots.release()


def test_a_reservation_kept_again_restarts_its_hold() -> None:
    slots = Slots("pushes", 1)
    kept = Reservations(slots, hold_s=0.3)
    assert reserve(kept, "w1", wait_s=0.0)
    time.sleep(0.2)
    assert reserve(kept, "w1", wait_s=0.0)  # before it lapsed: held 0.3 s from now
    time.sleep(0.2)
    assert kept.take("w1") and kept.lapsed == 0
    slots.release()


def test_one_workers_concurrent_reservations_keep_one_slot() -> None:
    slots = Slots("pushes", 8)
    kept = Reservations(slots, hold_s=60.0)
    go = threading.Barrier(8)

    def reserve_at_once() -> None:
        go.wait()
        assert reserve(kept, "w1", wait_s=1.0)

    threads = [threading.Thread(target=reserve_at_once) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert kept.held() == 1 and slots.in_use == 1
    assert kept.take("w1")
    slots.release()


def test_a_reservation_must_be_held_a_while() -> None:
    with pytest.raises(ValueError, match="held for > 0 s"):
        Reservations(Slots("pushes", 1), hold_s=0.0)



def _sweepers(what: str) -> int:
    return sum(t.name == f"reservations of {what}" and t.is_alive() for t in threading.enumerate())


def _until(done: Callable[[], bool], within_s: float = 5.0) -> bool:
    deadline = time.monotonic() + within_s
    while not done():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_a_lapse_frees_its_slot_with_no_later_call() -> None:
    slots = Slots("pushes", 1)
    kept = Reservations(slots, hold_s=0.05)
    assert reserve(kept, "w1", wait_s=0.0) and slots.in_use == 1
    assert _until(lambda: slots.in_use == 0)  # nobody asked: the sweeper lapsed it
    assert kept.lapsed == 1 and kept.held() == 0


def test_one_sweeper_serves_every_reservation_and_ends_with_the_last() -> None:
    slots = Slots("many pushes", 64)
    kept = Reservations(slots, hold_s=0.3)
    for k in range(50):
        assert reserve(kept, f"w{k}", wait_s=0.0)
    assert kept.held() == 50 and _sweepers("many pushes") == 1  # one thread, not one per reservation
    for k in range(25):
        assert kept.take(f"w{k}")
    assert _until(lambda: kept.held() == 0) and kept.lapsed == 25 and slots.in_use == 25  # the taken ones stay
    assert _until(lambda: _sweepers("many pushes") == 0)
    assert reserve(kept, "w0", wait_s=0.0) and _sweepers("many pushes") == 1  # started again on demand
    assert kept.take("w0")


def test_reservations_lapse_oldest_first_and_a_kept_again_one_moves_last() -> None:
    now = [0.0]
    slots = Slots("pushes", 3)
    kept = Reservations(slots, hold_s=10.0, clock=lambda: now[0])  # its sweeper waits real seconds: we sweep
    for worker in ("w1", "w2", "w3"):
        assert reserve(kept, worker, wait_s=0.0)
        now[0] += 1.0
    assert reserve(kept, "w1", wait_s=0.0)  # at t=3: lapses at 13, after w2 (11) and w3 (12)
    assert slots.in_use == 3
    now[0] = 11.5
    assert kept.lapse_due() == 0.5 and kept.lapsed == 1 and not kept.take("w2") and slots.in_use == 2
    now[0] = 12.5
    assert kept.lapse_due() == 0.5 and kept.lapsed == 2 and not kept.take("w3")
    assert kept.take("w1") and kept.lapse_due() is None and slots.in_use == 1
