"""Records closed rounds off the state lock: a round's checkpoint (fsynced) and metrics row are written by one
background thread, in round order, while the coordinator goes on serving heartbeats and pushes.

The state machine hands over what a round closed with under its lock (`ClosedRound`: the record, and the
replica and aggregator states it produced). Those are not copied: a round's close builds new state objects
instead of changing the old ones (protocols/round.py), and the replica, which the coordinator's closes step in
place, is handed over lent (`RoundAggregator.lend`) until it is written, so what is handed over stays as it
was while it is written. `flush` waits until everything handed over is written (a summary, or a
test reading the run directory, calls it first); a failed write is logged, stops further recording, and is
raised by `flush`.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from coordinator.round_record import RoundRecord

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClosedRound:
    record: RoundRecord
    replica: Any
    aggregator_state: Any
    downlink_state: Any
    members: dict[str, Any]
    elapsed_s: float
    release: Callable[[], None] = lambda: None  # gives back the replica's loan (RoundAggregator.lend) once written


class RoundRecorder:
    def __init__(self, write: Callable[[ClosedRound], None]) -> None:
        self._write = write
        self._queue: queue.Queue[ClosedRound] = queue.Queue()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True, name="lowband-recorder")
        self._thread.start()

    def put(self, closed: ClosedRound) -> None:
        self._queue.put(closed)

    def flush(self) -> None:
        """Wait until every round handed over is written; RuntimeError if a write failed."""
        self._queue.join()
        if self.error is not None:
            raise RuntimeError(f"recording a closed round failed: {self.error}") from self.error

    def _run(self) -> None:
        while True:
            closed = self._queue.get()
            try:
                if self.error is None:
                    self._write(closed)
            except Exception as err:  # a full disk, say: the run goes on, the run directory stops here
                log.exception("could not record round %d", closed.record.round)
                self.error = err
            finally:
                closed.release()
                self._queue.task_done()
