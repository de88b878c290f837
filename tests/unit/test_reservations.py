"""coordinator/reservations.py: a slot kept per worker until its push takes it or it lapses."""

from __future__ import annotations

import threading
import time

import pytest

from coordinator.reservations import Reservations
from protocols.wire.servicing import Slots


def test_a_reservation_keeps_a_slot_until_its_push_takes_it() -> None:
    slots = Slots("pushes", 2)
    kept = Reservations(slots, hold_s=60.0)
    assert kept.reserve("w1", wait_s=0.0) and slots.in_use == 1
    assert kept.reserve("w1", wait_s=0.0) and slots.in_use == 1  # one per worker: kept again, not twice
    assert kept.take("w1") and kept.held() == 0
    assert slots.in_use == 1  # now the push's, until it releases it
    assert not kept.take("w1")  # taken once
    slots.release()
    assert slots.in_use == 0


def test_a_reservation_not_taken_in_time_lapses_and_frees_its_slot() -> None:
    slots = Slots("pushes", 1)
    kept = Reservations(slots, hold_s=0.1)
    assert kept.reserve("w1", wait_s=0.0)
    assert not kept.reserve("w2", wait_s=0.0)  # the only slot is w1's
    assert kept.reserve("w2", wait_s=5.0)  # w1's lapses within the wait
    assert kept.lapsed == 1 and not kept.take("w1") and kept.take("w2")
    slots.release()


def test_a_reservation_kept_again_restarts_its_hold() -> None:
    slots = Slots("pushes", 1)
    kept = Reservations(slots, hold_s=0.3)
    assert kept.reserve("w1", wait_s=0.0)
    time.sleep(0.2)
    assert kept.reserve("w1", wait_s=0.0)  # before it lapsed: held 0.3 s from now
    time.sleep(0.2)
    assert kept.take("w1") and kept.lapsed == 0
    slots.release()


def test_one_workers_concurrent_reservations_keep_one_slot() -> None:
    slots = Slots("pushes", 8)
    kept = Reservations(slots, hold_s=60.0)
    go = threading.Barrier(8)

    def reserve() -> None:
        go.wait()
        assert kept.reserve("w1", wait_s=1.0)

    threads = [threading.Thread(target=reserve) for _ in range(8)]
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
