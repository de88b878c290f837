"""The gRPC star: updates go up to the coordinator, each round's aggregate comes down. Workers only dial
out (NAT is fine). `exchange` pushes and pulls on a background thread, so the caller may keep computing.

A heartbeat thread keeps the coordinator from declaring a slow-but-alive worker dead during long inner
loops; `report` feeds it the latest step and loss. While a long poll, pull or push is open, the coordinator
counts that call as proof of life (`CoordinatorState.attend`), and a beat with no new step or loss is skipped.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any

import grpc

from protocols.base import Aggregate, Update
from protocols.replica import Params, Replica
from protocols.wire.messages import JoinReply
from worker.client import BEAT_JOIN_S, CoordinatorClient, EarlyRound, StaleRound
from worker.traffic import Traffic
from worker.transports.star import PushOutcome, StarTransport


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
                self.client.beat(self.step, self.loss)  # skipped while an open call speaks for this worker


class GrpcTransport(StarTransport):
    """One worker's side of the star, after `client.join` (whose reply says whether to offer the state)."""

    def __init__(self, client: CoordinatorClient, joined: JoinReply) -> None:
        super().__init__("lowband-exchange")
        self.client, self.joined = client, joined
        self.worker_id = joined.worker_id
        # Beat from now on: building the corpus and model can take longer than the heartbeat timeout.
        self._beat = _Heartbeat(client, joined.heartbeat_interval_s)
        self._beat.start()

    @property
    def bytes_sent(self) -> int:
        return self.client.bytes_sent

    @property
    def bytes_received(self) -> int:
        return self.client.bytes_received

    @property
    def traffic(self) -> Traffic:
        return self.client.traffic

    def _offer(self, params: Params) -> Replica | None:
        if not self.joined.has_global_state and self.client.offer_state(params):
            return Replica(self.joined.round, params)
        return None

    def _wait(self, after_round: int) -> tuple[int, str, str]:
        info = self.client.wait_round(after_round)
        self.target_round_s = info.target_round_s
        self.deal = (info.membership_epoch, info.shard_index, info.shard_count)
        return info.round, info.phase.value, info.state_hash

    def _push(self, round_: int, update: Update, metrics: dict[str, float]) -> PushOutcome:
        try:
            reply = self.client.push(round_, update, metrics)
        except StaleRound:
            return "stale"
        except EarlyRound:
            return "early"
        return "late" if reply.round > round_ else "accepted"

    def _aggregate(self, round_: int, own: Update | None) -> tuple[Aggregate, str] | None:
        try:
            header, aggregate = self.client.pull_aggregate(round_, own)
        except grpc.RpcError as err:
            if err.code() is grpc.StatusCode.FAILED_PRECONDITION:
                return None
            raise
        return aggregate, header.state_hash

    def _attest(self, base_digest: str) -> None:
        self.client.attest_base(base_digest)

    def _pull(self, resync: bool) -> Replica:
        return self.client.pull(resync=resync)

    def report(self, step: int, loss: float | None, eval_loss: float | None) -> None:
        self._beat.step, self._beat.loss = step, loss if loss is not None else self._beat.loss
        if eval_loss is not None:
            self.client.heartbeat(step, self._beat.loss, eval_loss)

    def close(self) -> None:
        self._beat.stop.set()
        self._beat.join(timeout=BEAT_JOIN_S)  # not left inside a call when the process exits
        super().close()
        with contextlib.suppress(Exception):  # leaving is best effort: the coordinator times a silent worker out
            self.client.leave()

    def __enter__(self) -> GrpcTransport:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
