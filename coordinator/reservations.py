"""Admission slots kept for workers between `ReservePush` and their push (coordinator/servicer.py).

A push that waits for admission inside its own stream reads nothing meanwhile, but its client has already sent
what the stream's flow-control window lets through (gRPC's BDP probing grows it past a whole update), and that
waits in the coordinator's receive buffers: 799 waiting pushes held ~300 MB at 1,000 workers (BENCHMARKS.md
"Coordinator scale"). A worker that first reserves a slot sends its payload only once the slot is its own, so
what waits is a small unary call. A reservation not used within `hold_s` lapses and frees its slot."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from coordinator.errors import Code, Rejected
from protocols.wire.servicing import Slots


class Reservations:
    """At most one slot of `slots` kept per worker, each for `hold_s` seconds unless taken by its push first.

    One sweeper thread lapses them, and only while any is held: a timer thread per reservation would start and
    stop a thread per push, a thousand a round at a thousand workers. Every hold is `hold_s` from when it was kept,
    so the reservations lapse in the order they were kept (kept again: moved to the end), and the sweeper only
    ever waits for the oldest."""

    def __init__(self, slots: Slots, hold_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        if not hold_s > 0:
            raise ValueError(f"a reservation must be held for > 0 s, got {hold_s}")
        self.slots, self.hold_s, self.clock = slots, hold_s, clock
        self._cond = threading.Condition()
        self._held: dict[str, float] = {}  # worker id -> when its reservation lapses, oldest first
        self._sweeping = False
        self.lapsed = 0  # reservations that ran out unused (tests, logs)

    async def reserve(self, worker_id: str, wait_s: float) -> bool:
        """Keep a slot for `worker_id`, waiting up to `wait_s` for one (on the caller's event loop, holding no
        thread); False when none came free. A worker that holds one already keeps it, for `hold_s` from now."""
        with self._cond:
            held = self._held.pop(worker_id, None) is not None
        if not held:
            try:
                await self.slots.acquire_async(wait_s)
            except Rejected as busy:
                if busy.code is Code.RESOURCE_EXHAUSTED:
                    return False
                raise
        self._keep(worker_id)
        return True

    def _keep(self, worker_id: str) -> None:
        with self._cond:
            twice = worker_id in self._held  # the same worker's two calls both took a slot: it keeps one
            if not twice:
                self._held[worker_id] = self.clock() + self.hold_s
                if not self._sweeping:
                    self._sweeping = True
                    threading.Thread(target=self._sweep, name=f"reservations of {self.slots.what}",
                                     daemon=True).start()
        if twice:
            self.slots.release()

    def take(self, worker_id: str) -> bool:
        """True when `worker_id` held a reservation: its slot is now the caller's, who `release`s it on `slots`."""
        with self._cond:
            return self._held.pop(worker_id, None) is not None

    def _sweep(self) -> None:
        """The sweeper: lapse each reservation at its time; return once none is held."""
        with self._cond:
            while (left := self.lapse_due()) is not None:
                self._cond.wait(left)  # taken or kept again meanwhile: the next look finds the new oldest
            self._sweeping = False

    def lapse_due(self) -> float | None:
        """Lapse every reservation whose time has come, oldest first, freeing its slot; the seconds until the
        next one lapses, or None when none is held."""
        with self._cond:
            now = self.clock()
            while self._held:
                worker_id, lapses = next(iter(self._held.items()))
                if lapses > now:
                    return lapses - now
                del self._held[worker_id]
                self.lapsed += 1
                self.slots.release()
            return None

    def held(self) -> int:
        with self._cond:
            return len(self._held)
