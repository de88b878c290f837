"""Admission slots kept for workers between `ReservePush` and their push (coordinator/servicer.py).

A push that waits for admission inside its own stream reads nothing meanwhile, but its client has already sent
what the stream's flow-control window lets through (gRPC's BDP probing grows it past a whole update), and that
waits in the coordinator's receive buffers: 799 waiting pushes held ~300 MB at 1,000 workers (BENCHMARKS.md
"Coordinator scale"). A worker that first reserves a slot sends its payload only once the slot is its own, so
what waits is a small unary call. A reservation not used within `hold_s` lapses and frees its slot."""

from __future__ import annotations

import threading

from coordinator.errors import Code, Rejected
from protocols.wire.servicing import Slots


class Reservations:
    """At most one slot of `slots` kept per worker, each for `hold_s` seconds unless taken by its push first."""

    def __init__(self, slots: Slots, hold_s: float) -> None:
        if not hold_s > 0:
            raise ValueError(f"a reservation must be held for > 0 s, got {hold_s}")
        self.slots, self.hold_s = slots, hold_s
        self._lock = threading.Lock()
        self._held: dict[str, tuple[object, threading.Timer]] = {}  # worker id -> (this reservation, its lapse)
        self.lapsed = 0  # reservations that ran out unused (tests, logs)

    def reserve(self, worker_id: str, wait_s: float) -> bool:
        """Keep a slot for `worker_id`, waiting up to `wait_s` for one; False when none came free. A worker
        that holds one already keeps it, for `hold_s` from now."""
        with self._lock:
            held = self._held.pop(worker_id, None)
        if held is not None:
            held[1].cancel()
        else:
            try:
                self.slots.acquire(wait_s)
            except Rejected as busy:
                if busy.code is Code.RESOURCE_EXHAUSTED:
                    return False
                raise
        self._keep(worker_id)
        return True

    def _keep(self, worker_id: str) -> None:
        mine = object()
        timer = threading.Timer(self.hold_s, self._lapse, (worker_id, mine))
        timer.daemon = True
        with self._lock:
            other = self._held.get(worker_id)
            if other is None:
                self._held[worker_id] = (mine, timer)
        if other is not None:  # the same worker's two calls both took a slot: it keeps one
            self.slots.release()
            return
        timer.start()

    def take(self, worker_id: str) -> bool:
        """True when `worker_id` held a reservation: its slot is now the caller's, who `release`s it on `slots`."""
        with self._lock:
            held = self._held.pop(worker_id, None)
        if held is None:
            return False
        held[1].cancel()
        return True

    def _lapse(self, worker_id: str, mine: object) -> None:
        with self._lock:
            held = self._held.get(worker_id)
            if held is None or held[0] is not mine:
                return  # taken, or kept again, meanwhile
            del self._held[worker_id]
            self.lapsed += 1
        self.slots.release()

    def held(self) -> int:
        with self._lock:
            return len(self._held)
