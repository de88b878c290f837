"""The seam between the round loop and whatever moves bytes: `Transport`, and the `Handle` it returns.

`exchange` returns at once with a `Handle` (a future) to the round's result, so a caller may compute
while its update travels (CO2-style overlap) and block only when it needs the aggregate. A wrapper that
emulates a slow link can wrap any transport: every method goes through the object it wraps, and
`bytes_sent` / `bytes_received` count what actually moved, both ways.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Generic, TypeVar

from protocols.base import Aggregate, Update
from protocols.replica import Params, Replica
from worker.traffic import Traffic

T = TypeVar("T")


@dataclass(frozen=True)
class RoundStatus:
    """Where the aggregator stands: the round it has open (when finished, the rounds done) and the
    digest of its replica at that round."""

    round: int
    finished: bool
    state_hash: str


@dataclass(frozen=True)
class RoundResult:
    """What came back for one round. accepted: our update was folded (False: the round closed without
    it). aggregate: what every replica applies (None: no longer available; resync the whole replica).
    state_hash: the digest of the aggregator's replica after applying it. folded_late: not accepted for its
    round, but folded, weighted down, into a later one (`cluster.late: stale`): what it carried was used."""

    accepted: bool
    aggregate: Aggregate | None
    state_hash: str
    folded_late: bool = False


class Handle(Generic[T]):
    """A pending result: `result()` blocks until it is there (and re-raises what the transport raised)."""

    def __init__(self, future: Future[T]) -> None:
        self._future = future
        self.handed_at = time.perf_counter()
        self.finished_at: float | None = None  # perf_counter when the result arrived (for comm time)
        future.add_done_callback(self._finished)

    def _finished(self, _: Future[T]) -> None:
        self.finished_at = time.perf_counter()

    @property
    def seconds(self) -> float:
        """From hand-off to result (so far, while pending): the exchange's communication time."""
        return (self.finished_at or time.perf_counter()) - self.handed_at

    @classmethod
    def completed(cls, value: T) -> Handle[T]:
        future: Future[T] = Future()
        future.set_result(value)
        return cls(future)

    def done(self) -> bool:
        return self._future.done()

    def result(self, timeout: float | None = None) -> T:
        return self._future.result(timeout)


class Transport(ABC):
    """Carries one worker's side of the rounds. Bytes are counted both ways, as they crossed the wire."""

    worker_id: str = ""
    # The round's target compute time the aggregator last named, for adaptive inner steps
    # (protocols/local_updates.py); 0.0 = none (run every inner step).
    target_round_s: float = 0.0
    # Elastic membership's deal the aggregator last named for this worker (coordinator/deal.py): (membership
    # epoch, shard index, shard count); shard index -1 = sit the open round out; (0, 0, 0) = fixed membership.
    deal: tuple[int, int, int] = (0, 0, 0)
    _sent: int = 0
    _received: int = 0

    @property
    def bytes_sent(self) -> int:
        return self._sent

    @property
    def bytes_received(self) -> int:
        return self._received

    @property
    def traffic(self) -> Traffic:
        """The bytes split by kind (worker/traffic.py). A transport that does not tell them apart moves only the
        round's exchange: all of it counts as protocol bytes."""
        return Traffic(protocol_sent=self.bytes_sent, protocol_received=self.bytes_received)

    @abstractmethod
    def start(self, params: Params, base_digest: str = "") -> Replica:
        """Take part in the run with these freshly initialised (trainable) parameters; the replica to train from.
        `base_digest`: of the frozen base weights under adapters ("" when every weight trains): a transport
        with an aggregator or peers to agree with refuses to start when theirs differs."""

    @abstractmethod
    def status(self, after_round: int) -> RoundStatus:
        """Block until the aggregator's open round is past `after_round`, or the run finished."""

    @abstractmethod
    def exchange(self, round_: int, update: Update, metrics: dict[str, float]) -> Handle[RoundResult]:
        """Send this worker's update for `round_`; a handle to the round's result."""

    @abstractmethod
    def resync(self) -> Replica:
        """The aggregator's whole replica (a join, a rejoin, or a digest mismatch: the only dense move)."""

    def report(self, step: int, loss: float | None, eval_loss: float | None) -> None:  # noqa: B027
        """Progress for the aggregator's view (liveness included); transports without one ignore it."""

    def close(self) -> None:  # noqa: B027
        """Leave the run and release what the transport holds."""
