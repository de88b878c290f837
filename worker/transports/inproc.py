"""The coordinator's state machine in this process: no sockets, no serialization. For unit tests and the
federated simulator: many workers (threads) share one state machine (`deploy/inproc.py` builds it).

Bytes are counted as the payloads' component bytes (what a codec produced), both ways; the wire's
framing is not modelled here.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

from compression.payload import Payload, dense
from protocols.base import Aggregate, Update
from protocols.config import PROTOCOL_VERSION
from protocols.refusals import Rejected, is_early, is_stale
from protocols.replica import Params, Replica
from worker.transports.base import Handle, RoundResult, RoundStatus, Transport

# How long one wait on the state machine lasts before it is asked again (the run may have finished).
WAIT_S = 1.0


class RoundService(Protocol):
    """What the in-process transport calls: the coordinator's state machine (`coordinator.state`), handed
    in by whoever builds the run (the worker package never imports the coordinator)."""

    @property
    def round(self) -> int: ...
    def join(self, hostname: str, token: str, protocol_version: int, requested_id: str = "") -> Any: ...
    def must_offer_state(self, worker_id: str) -> bool: ...
    def offer_initial_state(self, worker_id: str, token: str, payloads: dict[str, Payload],
                            wire_bytes: int = 0) -> None: ...  # fmt: skip
    def wait_for_round(self, after_round: int, timeout: float) -> tuple[int, Any, str]: ...
    def submit(self, worker_id: str, token: str, round_: int, update: Update, metrics: dict[str, float],
               wire_bytes: int) -> int: ...  # fmt: skip
    def aggregate_for(self, worker_id: str, token: str, round_: int) -> tuple[Aggregate, str, int | None]: ...
    def snapshot(self, worker_id: str, token: str, resync: bool = False) -> Any: ...
    def count_download(self, worker_id: str, nbytes: int) -> None: ...
    def heartbeat(self, worker_id: str, token: str, step: int, loss: float | None,
                  eval_loss: float | None) -> None: ...  # fmt: skip
    def leave(self, worker_id: str, token: str) -> None: ...


class InprocTransport(Transport):
    def __init__(self, service: RoundService, token: str = "", name: str = "") -> None:
        self.state, self.token = service, token
        member = self.state.join("inproc", self.token, PROTOCOL_VERSION, name)
        self.worker_id, self.index = member.worker_id, member.index
        self._sent = self._received = 0
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=f"lowband-inproc-{self.worker_id}")

    def start(self, params: Params) -> Replica:
        if self.state.must_offer_state(self.worker_id):
            offered = {n: dense(t) for n, t in params.items()}
            nbytes = sum(p.nbytes() for p in offered.values())
            self._sent += nbytes
            self.state.offer_initial_state(self.worker_id, self.token, offered, nbytes)
            return Replica(self.state.round, {n: t.clone() for n, t in params.items()})
        status = self.status(-1)
        local = Replica(status.round, {n: t.clone() for n, t in params.items()})
        if not status.finished and local.digest() == status.state_hash:
            return local  # every worker seeds the same model: nothing to pull
        return self._pull(resync=False)

    def status(self, after_round: int) -> RoundStatus:
        while True:
            round_, phase, state_hash = self.state.wait_for_round(after_round, WAIT_S)
            if phase.value == "finished":
                return RoundStatus(round_, True, state_hash)
            if phase.value == "training" and round_ > after_round:
                return RoundStatus(round_, False, state_hash)

    def exchange(self, round_: int, update: Update, metrics: dict[str, float]) -> Handle[RoundResult]:
        return Handle(self._pool.submit(self._exchange, round_, update, metrics))

    def _exchange(self, round_: int, update: Update, metrics: dict[str, float]) -> RoundResult:
        accepted = True
        while True:
            try:
                self.state.submit(self.worker_id, self.token, round_, update, metrics, update.nbytes())
            except Rejected as err:
                if is_early(err):  # overlapping: the previous round has not closed yet
                    self.status(round_ - 1)
                    continue
                if not is_stale(err):
                    raise
                accepted = False
            break
        self._sent += update.nbytes()
        self.status(round_)
        try:
            aggregate, state_hash, _ = self.state.aggregate_for(self.worker_id, self.token, round_)
        except Rejected:
            return RoundResult(accepted, None, "")
        self._received += aggregate.nbytes()
        self.state.count_download(self.worker_id, aggregate.nbytes())
        return RoundResult(accepted, aggregate, state_hash)

    def resync(self) -> Replica:
        return self._pull(resync=True)

    def _pull(self, resync: bool) -> Replica:
        replica = self.state.snapshot(self.worker_id, self.token, resync).replica
        nbytes = sum(t.numel() * t.element_size() for t in replica.to_tensors().values())
        self._received += nbytes
        self.state.count_download(self.worker_id, nbytes)
        return replica

    def report(self, step: int, loss: float | None, eval_loss: float | None) -> None:
        self.state.heartbeat(self.worker_id, self.token, step, loss, eval_loss)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self.state.leave(self.worker_id, self.token)
