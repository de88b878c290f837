"""The coordinator's state machine in this process: no sockets, no serialization. For unit tests and the
federated simulator: many workers (threads) share one state machine (`deploy/inproc.py` builds it).

Bytes are counted as the payloads' component bytes (what a codec produced), both ways; the wire's
framing is not modelled here.
"""

from __future__ import annotations

from typing import Any, Protocol

from compression.payload import Payload, dense
from protocols.base import Aggregate, Update
from protocols.config import PROTOCOL_VERSION
from protocols.refusals import Rejected, is_early, is_stale
from protocols.replica import Params, Replica
from worker.traffic import Traffic
from worker.transports.star import PushOutcome, StarTransport

# How long one wait on the state machine lasts before it is asked again (the run may have finished).
WAIT_S = 1.0


class RoundService(Protocol):
    """What the in-process transport calls: the coordinator's state machine (`coordinator.state`), handed
    in by whoever builds the run (the worker package never imports the coordinator)."""

    target_round_s: float  # the round's target compute time, for adaptive inner steps (0 = none)

    @property
    def round(self) -> int: ...
    def join_session(self, hostname: str, token: str, protocol_version: int,
                     requested_id: str = "") -> tuple[Any, str]: ...  # fmt: skip
    def must_offer_state(self, worker_id: str) -> bool: ...
    def offer_initial_state(self, worker_id: str, token: str, payloads: dict[str, Payload],
                            wire_bytes: int = 0) -> None: ...  # fmt: skip
    def wait_for_round_dealt(self, worker_id: str, after_round: int, timeout: float
                             ) -> tuple[int, Any, str, tuple[int, int, int]]: ...  # fmt: skip
    def submit(self, worker_id: str, token: str, round_: int, update: Update, metrics: dict[str, float],
               wire_bytes: int) -> int: ...  # fmt: skip
    def aggregate_for(self, worker_id: str, token: str, round_: int) -> tuple[Aggregate, str, int | None]: ...
    def snapshot(self, worker_id: str, token: str, resync: bool = False) -> Any: ...
    def count_download(self, worker_id: str, nbytes: int, kind: str = "protocol") -> None: ...
    def heartbeat(self, worker_id: str, token: str, step: int, loss: float | None,
                  eval_loss: float | None) -> None: ...  # fmt: skip
    def leave(self, worker_id: str, token: str) -> None: ...
    def attest_base(self, worker_id: str, token: str, digest: str) -> str: ...


class InprocTransport(StarTransport):
    def __init__(self, service: RoundService, token: str = "", name: str = "") -> None:
        self.state = service
        # The run's token joins; every later call carries the session the join issued (coordinator/sessions.py).
        member, self.token = self.state.join_session("inproc", token, PROTOCOL_VERSION, name)
        self.worker_id, self.index = member.worker_id, member.index
        self._traffic = Traffic()
        super().__init__(f"lowband-inproc-{self.worker_id}")

    def _offer(self, params: Params) -> Replica | None:
        if not self.state.must_offer_state(self.worker_id):
            return None
        offered = {n: dense(t) for n, t in params.items()}
        nbytes = sum(p.nbytes() for p in offered.values())
        self._traffic.add("state", sent=nbytes)
        self.state.offer_initial_state(self.worker_id, self.token, offered, nbytes)
        return Replica(self.state.round, {n: t.clone() for n, t in params.items()})

    def _wait(self, after_round: int) -> tuple[int, str, str]:
        round_, phase, state_hash, self.deal = self.state.wait_for_round_dealt(self.worker_id, after_round, WAIT_S)
        self.target_round_s = self.state.target_round_s
        return round_, phase.value, state_hash

    def _push(self, round_: int, update: Update, metrics: dict[str, float]) -> PushOutcome:
        try:
            counted = self.state.submit(self.worker_id, self.token, round_, update, metrics, update.nbytes())
        except Rejected as err:
            if is_early(err):
                return "early"
            if not is_stale(err):
                raise
            self._traffic.add("protocol", sent=update.nbytes())
            return "stale"
        self._traffic.add("protocol", sent=update.nbytes())
        return "late" if counted > round_ else "accepted"

    def _aggregate(self, round_: int, own: Update | None) -> tuple[Aggregate, str] | None:
        try:
            aggregate, state_hash, _ = self.state.aggregate_for(self.worker_id, self.token, round_)
        except Rejected:
            return None
        self._traffic.add("protocol", received=aggregate.nbytes())
        self.state.count_download(self.worker_id, aggregate.nbytes())
        return aggregate, state_hash

    def _attest(self, base_digest: str) -> None:
        self.state.attest_base(self.worker_id, self.token, base_digest)

    def _pull(self, resync: bool) -> Replica:
        snap = self.state.snapshot(self.worker_id, self.token, resync)
        try:  # a copy: the coordinator steps its own replica in place once the loan is back
            replica = snap.replica.copy()
        finally:
            snap.release()
        nbytes = sum(t.numel() * t.element_size() for t in replica.to_tensors().values())
        self._traffic.add("state", received=nbytes)
        self.state.count_download(self.worker_id, nbytes, "state")
        return replica

    @property
    def bytes_sent(self) -> int:
        return self._traffic.sent

    @property
    def bytes_received(self) -> int:
        return self._traffic.received

    @property
    def traffic(self) -> Traffic:
        """No control calls cross a wire in process: protocol and state bytes only."""
        return self._traffic

    def report(self, step: int, loss: float | None, eval_loss: float | None) -> None:
        self.state.heartbeat(self.worker_id, self.token, step, loss, eval_loss)

    def close(self) -> None:
        super().close()
        self.state.leave(self.worker_id, self.token)
