"""What the transports that talk to a coordinator's state machine share, whether over gRPC or in process:
joining with the seeded model, waiting for a round, pushing an update (an early push waits for its round
to open, a stale one is dropped or, with `cluster.late: stale`, folded late into the open round), and
pulling the closed round's aggregate on a background thread.

A subclass says how to reach the state machine through five hooks; the round protocol is written once.
"""

from __future__ import annotations

from abc import abstractmethod
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

from protocols.base import Aggregate, Update
from protocols.replica import Params, Replica
from worker.transports.base import Handle, RoundResult, RoundStatus, Transport

# accepted: folded into its round; late: its round had closed, folded into a later one (`cluster.late: stale`);
# stale: its round had closed, dropped; early: its round is not open yet.
PushOutcome = Literal["accepted", "late", "stale", "early"]


class StarTransport(Transport):
    """A worker's side of a coordinator's rounds; see the module docstring."""

    def __init__(self, thread_name: str) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=thread_name)

    # ---- how to reach the state machine ------------------------------------------------------------
    @abstractmethod
    def _offer(self, params: Params) -> Replica | None:
        """Offer the initial state if this worker is the one asked to; the replica it then holds, else None."""

    @abstractmethod
    def _wait(self, after_round: int) -> tuple[int, str, str]:
        """One wait for the round to pass `after_round`: (round, phase value, digest of the replica)."""

    @abstractmethod
    def _push(self, round_: int, update: Update, metrics: dict[str, float]) -> PushOutcome:
        """Hand the update in; what became of it (`PushOutcome`)."""

    @abstractmethod
    def _aggregate(self, round_: int, own: Update | None) -> tuple[Aggregate, str] | None:
        """Round `round_`'s aggregate and the digest after it (`own`: this worker's folded update), or None
        when the coordinator no longer keeps it."""

    @abstractmethod
    def _attest(self, base_digest: str) -> None:
        """State the frozen base's digest; raises when the coordinator's differs."""

    @abstractmethod
    def _pull(self, resync: bool) -> Replica:
        """The coordinator's whole replica (`resync`: ours fell behind or differed; else we are joining)."""

    # ---- the rounds ------------------------------------------------------------------------------------
    def start(self, params: Params, base_digest: str = "") -> Replica:
        """The offering worker's own parameters are the replica; another worker seeded the same model, so
        when the coordinator's digest matches its own fresh replica it pulls nothing. A worker with a frozen
        base attests it first, so a mismatch is refused before any state moves."""
        if base_digest:
            self._attest(base_digest)
        offered = self._offer(params)
        if offered is not None:
            return offered
        status = self.status(-1)  # the state exists once the first round opens
        local = Replica(status.round, params)
        if not status.finished and local.digest() == status.state_hash:
            return local
        return self._pull(resync=False)

    def status(self, after_round: int) -> RoundStatus:
        while True:
            round_, phase, state_hash = self._wait(after_round)
            if phase == "finished":
                return RoundStatus(round_, True, state_hash)
            if phase == "training" and round_ > after_round:
                return RoundStatus(round_, False, state_hash)

    def exchange(self, round_: int, update: Update, metrics: dict[str, float]) -> Handle[RoundResult]:
        return Handle(self._pool.submit(self._exchange, round_, update, metrics))

    def _exchange(self, round_: int, update: Update, metrics: dict[str, float]) -> RoundResult:
        while (outcome := self._push(round_, update, metrics)) == "early":
            self.status(round_ - 1)  # overlapping: the previous round has not closed yet
        accepted = outcome == "accepted"  # stale or late: the round closed without us (we were a straggler)
        self.status(round_)
        pulled = self._aggregate(round_, update if accepted else None)
        if pulled is None:
            return RoundResult(accepted, None, "", folded_late=outcome == "late")
        return RoundResult(accepted, *pulled, folded_late=outcome == "late")

    def resync(self) -> Replica:
        return self._pull(resync=True)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
