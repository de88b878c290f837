"""The gRPC star: updates go up to the coordinator, each round's aggregate comes down. Workers only dial
out (NAT is fine). `exchange` pushes and pulls on a background thread, so the caller may keep computing.

A heartbeat thread keeps the coordinator from declaring a slow-but-alive worker dead during long inner
loops; `report` feeds it the latest step and loss.
"""

from __future__ import annotations

import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc

from protocols.base import Update
from protocols.replica import Params, Replica
from protocols.wire.messages import JoinReply, Phase
from worker.client import CoordinatorClient, EarlyRound, StaleRound
from worker.transports.base import Handle, RoundResult, RoundStatus, Transport


class _Heartbeat(threading.Thread):
    def __init__(self, client: CoordinatorClient, interval: float) -> None:
        super().__init__(daemon=True, name="lowband-heartbeat")
        self.client, self.interval = client, interval
        self.step: int = 0
        self.loss: float | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(self.interval):
            with contextlib.suppress(Exception):  # a missed beat is retried at the next interval
                self.client.heartbeat(self.step, self.loss, None)


class GrpcTransport(Transport):
    """One worker's side of the star, after `client.join` (whose reply says whether to offer the state)."""

    def __init__(self, client: CoordinatorClient, joined: JoinReply) -> None:
        self.client, self.joined = client, joined
        self.worker_id = joined.worker_id
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="lowband-exchange")
        # Beat from now on: building the corpus and model can take longer than the heartbeat timeout.
        self._beat = _Heartbeat(client, joined.heartbeat_interval_s)
        self._beat.start()

    @property
    def bytes_sent(self) -> int:
        return self.client.bytes_sent

    @property
    def bytes_received(self) -> int:
        return self.client.bytes_received

    def start(self, params: Params) -> Replica:
        """The offering worker's own parameters are the replica; another worker seeded the same model, so
        when the coordinator's digest matches its own fresh replica it pulls nothing."""
        if not self.joined.has_global_state and self.client.offer_state(params):
            return Replica(self.joined.round, params)
        status = self.status(-1)  # the state exists once the first round opens
        local = Replica(status.round, params)
        if not status.finished and local.digest() == status.state_hash:
            return local
        return self.client.pull()

    def status(self, after_round: int) -> RoundStatus:
        while True:
            info = self.client.wait_round(after_round)
            if info.phase is Phase.FINISHED:
                return RoundStatus(info.round, True, info.state_hash)
            if info.phase is Phase.TRAINING and info.round > after_round:
                return RoundStatus(info.round, False, info.state_hash)

    def exchange(self, round_: int, update: Update, metrics: dict[str, float]) -> Handle[RoundResult]:
        return Handle(self._pool.submit(self._exchange, round_, update, metrics))

    def _exchange(self, round_: int, update: Update, metrics: dict[str, float]) -> RoundResult:
        accepted = True
        while True:
            try:
                self.client.push(round_, update, metrics)
            except StaleRound:
                accepted = False  # the round closed without us (we were a straggler)
            except EarlyRound:
                self.status(round_ - 1)  # overlapping: the previous round has not closed yet
                continue
            break
        self.status(round_)
        try:
            header, aggregate = self.client.pull_aggregate(round_, update if accepted else None)
        except grpc.RpcError as err:
            if err.code() is grpc.StatusCode.FAILED_PRECONDITION:
                return RoundResult(accepted, None, "")
            raise
        return RoundResult(accepted, aggregate, header.state_hash)

    def resync(self) -> Replica:
        return self.client.pull(resync=True)

    def report(self, step: int, loss: float | None, eval_loss: float | None) -> None:
        self._beat.step, self._beat.loss = step, loss if loss is not None else self._beat.loss
        if eval_loss is not None:
            self.client.heartbeat(step, self._beat.loss, eval_loss)

    def close(self) -> None:
        self._beat.stop.set()
        self._pool.shutdown(wait=True)
        with contextlib.suppress(Exception):  # leaving is best effort: the coordinator times a silent worker out
            self.client.leave()

    def __enter__(self) -> GrpcTransport:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
