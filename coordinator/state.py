"""The coordinator's round and membership state machine, independent of any transport.

Phases: WAITING (for `cluster.workers` to join and for an initial state) -> TRAINING (rounds 0..R-1)
-> FINISHED. A round closes when every live worker has reported, or when its deadline has passed
and at least `cluster.quorum` have. Workers whose heartbeats stop are dropped from the live set.

Every public method takes the lock; `wait_for_round` blocks on a condition so workers can long-poll.
Anything refused raises `Rejected` and leaves the state exactly as it was.
"""

from __future__ import annotations

import dataclasses
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from compression.payload import Payload
from coordinator.errors import Code, Rejected
from coordinator.validate import Decoder, check_initial_state, check_update
from protocols.base import Accumulator, Params, Protocol, Update
from protocols.config import PROTOCOL_VERSION, RunConfig, to_yaml


class Phase(Enum):
    WAITING = "waiting"
    TRAINING = "training"
    FINISHED = "finished"


@dataclass
class Member:
    worker_id: str
    index: int
    hostname: str
    last_seen: float
    alive: bool = True
    step: int = 0
    loss: float | None = None
    eval_loss: float | None = None
    bytes_up: int = 0
    bytes_down: int = 0
    tokens: int = 0


@dataclass
class RoundRecord:
    """What the coordinator writes to metrics.jsonl when a round closes."""

    round: int
    workers: list[str]
    train_loss: float | None
    eval_loss: float | None
    tokens: int
    bytes_up: int
    bytes_down: int
    seconds: float
    closed_by: str  # "all" | "deadline"


@dataclass
class Snapshot:
    round: int
    phase: Phase
    params: Params
    state_hash: str


@dataclass
class _Round:
    number: int
    started: float
    acc: Accumulator
    reported: dict[str, dict[str, float]] = field(default_factory=dict)


class CoordinatorState:
    def __init__(
        self,
        cfg: RunConfig,
        protocol: Protocol,
        decode: Decoder,
        hasher: Callable[[Params], str],
        run_id: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_round: Callable[[RoundRecord, Params, Any], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.protocol = protocol
        self.decode = decode
        self.hasher = hasher
        self.run_id = run_id or uuid.uuid4().hex[:12]
        self.clock = clock
        self.on_round = on_round
        self.total_rounds = cfg.rounds
        self.members: dict[str, Member] = {}
        self.phase = Phase.WAITING
        self.round = 0
        self.params: Params | None = None
        self.state_hash = ""
        self.server_state: Any = None
        self.history: list[RoundRecord] = []
        # The one worker asked to offer the initial state, so only one dense copy crosses the wire.
        self.initializer: str | None = None
        self._current: _Round | None = None
        self._cond = threading.Condition()
        self.config_yaml = to_yaml(cfg)
        # Largest push accepted: before the state exists, an initial state of up to 8 GiB; after, twice
        # a dense copy of the model (no codec makes an update bigger than that) plus header slack.
        self.max_push_bytes = 8 << 30

    # ---- membership ----------------------------------------------------------------------------
    def join(self, hostname: str, token: str, protocol_version: int, requested_id: str = "") -> Member:
        with self._cond:
            self._check_token(token)
            if protocol_version != PROTOCOL_VERSION:
                raise Rejected(
                    Code.FAILED_PRECONDITION,
                    f"protocol version {protocol_version} is not supported (coordinator speaks {PROTOCOL_VERSION})",
                )
            if self.phase is Phase.FINISHED:
                raise Rejected(Code.FAILED_PRECONDITION, "the run has finished; no new workers are accepted")
            if requested_id and requested_id in self.members:
                member = self.members[requested_id]  # a reconnect keeps its index and counters
                member.alive, member.last_seen, member.hostname = True, self.clock(), hostname
            else:
                index = len(self.members)
                worker_id = requested_id or f"w{index}"
                member = Member(worker_id=worker_id, index=index, hostname=hostname, last_seen=self.clock())
                self.members[worker_id] = member
            if self.params is None and not self._initializer_alive():
                self.initializer = member.worker_id
            self._maybe_start()
            self._cond.notify_all()
            return member

    def must_offer_state(self, worker_id: str) -> bool:
        """Whether this worker is the one asked to offer the initial parameters."""
        with self._cond:
            return self.params is None and self.initializer == worker_id

    def _initializer_alive(self) -> bool:
        return self.initializer is not None and self.members[self.initializer].alive

    def heartbeat(self, worker_id: str, token: str, step: int, loss: float | None, eval_loss: float | None) -> None:
        with self._cond:
            member = self._member(worker_id, token)
            member.last_seen, member.alive = self.clock(), True
            member.step = step
            if loss is not None:
                member.loss = loss
            if eval_loss is not None:
                member.eval_loss = eval_loss
            self._maybe_start()  # a worker dropped while it was still loading may be back
            self._cond.notify_all()

    def leave(self, worker_id: str, token: str) -> None:
        with self._cond:
            member = self._member(worker_id, token)
            member.alive = False
            self._maybe_close()
            self._cond.notify_all()

    # ---- state -------------------------------------------------------------------------------
    def offer_initial_state(self, worker_id: str, token: str, payloads: dict[str, Payload]) -> None:
        with self._cond:
            self._member(worker_id, token)
            if self.params is not None:
                raise Rejected(Code.ALREADY_EXISTS, "the coordinator already holds the global state")
            params = check_initial_state(worker_id, payloads, self.decode)
            self._install(params, self.protocol.init_server_state(params))
            self._maybe_start()
            self._cond.notify_all()

    def restore(self, round_: int, params: Params, server_state: Any) -> None:
        """Resume from a checkpoint: global state and round, before any worker joins."""
        with self._cond:
            self._install(params, server_state)
            self.round = round_

    def check_member(self, worker_id: str, token: str) -> None:
        with self._cond:
            self._member(worker_id, token)

    def snapshot(self, worker_id: str, token: str) -> Snapshot:
        with self._cond:
            self._member(worker_id, token)
            if self.params is None:
                raise Rejected(Code.FAILED_PRECONDITION, "no global state yet: a worker must offer it first")
            return Snapshot(self.round, self.phase, self.params, self.state_hash)

    def submit(
        self, worker_id: str, token: str, round_: int, update: Update, metrics: dict[str, float], wire_bytes: int
    ) -> int:
        """Validate and fold one worker's update into the open round. Returns the round it counted for."""
        with self._cond:
            member = self._member(worker_id, token)
            if self.phase is not Phase.TRAINING or self._current is None or self.params is None:
                raise Rejected(Code.FAILED_PRECONDITION, f"no round is open (phase {self.phase.value})")
            current = self._current
            if round_ != current.number:
                raise Rejected(
                    Code.FAILED_PRECONDITION,
                    f"stale round: update is for round {round_}, the coordinator is at round {current.number}",
                )
            if worker_id in current.reported:
                raise Rejected(Code.ALREADY_EXISTS, f"worker {worker_id} already sent its update for round {round_}")
            check_update(worker_id, update.payloads, self.params, self.decode)
            current.acc.fold(worker_id, update)
            current.reported[worker_id] = dict(metrics)
            member.bytes_up += wire_bytes
            member.tokens += int(metrics.get("tokens", 0))
            member.last_seen, member.alive = self.clock(), True
            self._maybe_close()
            self._cond.notify_all()
            return round_

    def count_download(self, worker_id: str, nbytes: int) -> None:
        with self._cond:
            if worker_id in self.members:
                self.members[worker_id].bytes_down += nbytes

    # ---- time --------------------------------------------------------------------------------
    def tick(self) -> None:
        """Drop workers whose heartbeats stopped; close a round whose deadline passed with a quorum."""
        with self._cond:
            now = self.clock()
            for member in self.members.values():
                if member.alive and now - member.last_seen > self.cfg.cluster.heartbeat_timeout_s:
                    member.alive = False
            self._maybe_close()
            self._cond.notify_all()

    def wait_for_round(self, after_round: int, timeout: float) -> tuple[int, Phase, str]:
        """Block until the round is past `after_round`, the run finished, or `timeout` passed."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                ready = self.phase is Phase.TRAINING and self.round > after_round
                if ready or self.phase is Phase.FINISHED:
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(min(left, 1.0))
            return self.round, self.phase, self.state_hash

    def members_copy(self) -> list[Member]:
        """A consistent copy of the member table, for progress displays and summaries."""
        with self._cond:
            return [dataclasses.replace(m) for m in self.members.values()]

    def live_members(self) -> list[Member]:
        with self._cond:
            return [m for m in self.members.values() if m.alive]

    # ---- internals ---------------------------------------------------------------------------
    def _check_token(self, token: str) -> None:
        if self.cfg.cluster.token and token != self.cfg.cluster.token:
            raise Rejected(Code.UNAUTHENTICATED, "bad token: the coordinator's token differs from the one sent")

    def _member(self, worker_id: str, token: str) -> Member:
        """The calling worker; any authenticated call is proof of life."""
        self._check_token(token)
        member = self.members.get(worker_id)
        if member is None:
            raise Rejected(Code.NOT_FOUND, f"unknown worker id {worker_id!r}: join first")
        member.last_seen, member.alive = self.clock(), True
        return member

    def _install(self, params: Params, server_state: Any) -> None:
        self.params = {k: v.detach().clone() for k, v in params.items()}
        self.server_state = server_state
        self.state_hash = self.hasher(self.params)
        self.max_push_bytes = 2 * sum(t.numel() * t.element_size() for t in self.params.values()) + (16 << 20)

    def _open_round(self) -> None:
        assert self.params is not None
        self._current = _Round(self.round, self.clock(), self.protocol.new_round(self.params))

    def _maybe_start(self) -> None:
        if self.phase is not Phase.WAITING or self.params is None:
            return
        if sum(m.alive for m in self.members.values()) < self.cfg.cluster.workers:
            return
        if self.round >= self.total_rounds:
            self.phase = Phase.FINISHED
            return
        self.phase = Phase.TRAINING
        self._open_round()

    def _maybe_close(self) -> None:
        current = self._current
        if self.phase is not Phase.TRAINING or current is None or self.params is None:
            return
        live = {m.worker_id for m in self.members.values() if m.alive}
        reported = set(current.reported)
        if reported and live <= reported:
            closed_by = "all"
        elif (
            self.clock() - current.started >= self.cfg.cluster.round_deadline_s
            and len(reported) >= self.cfg.cluster.quorum
        ):
            closed_by = "deadline"
        else:
            return
        new_params, self.server_state = self.protocol.aggregate(self.params, current.acc, self.server_state)
        self._install(new_params, self.server_state)
        record = self._record(current, closed_by)
        self.history.append(record)
        self.round += 1
        if self.on_round is not None:
            self.on_round(record, self.params, self.server_state)
        if self.round >= self.total_rounds:
            self.phase, self._current = Phase.FINISHED, None
        else:
            self._open_round()

    def _record(self, current: _Round, closed_by: str) -> RoundRecord:
        def mean(key: str) -> float | None:
            vals = [m[key] for m in current.reported.values() if key in m]
            return sum(vals) / len(vals) if vals else None

        return RoundRecord(
            round=current.number,
            workers=sorted(current.reported),
            train_loss=mean("train_loss"),
            eval_loss=mean("eval_loss"),
            tokens=sum(m.tokens for m in self.members.values()),
            bytes_up=sum(m.bytes_up for m in self.members.values()),
            bytes_down=sum(m.bytes_down for m in self.members.values()),
            seconds=self.clock() - current.started,
            closed_by=closed_by,
        )
