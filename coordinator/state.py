"""The coordinator's round and membership state machine, independent of any transport.

Phases: WAITING (for `cluster.workers` to join and for an initial state) -> TRAINING (rounds 0..R-1)
-> FINISHED. A round closes when every live worker has reported, or when its deadline has passed
and at least `cluster.quorum` have. Workers whose heartbeats stop are dropped from the live set.

The aggregation itself is `protocols.round.RoundAggregator`, the same pure code the all-gather ranks run.
When a round closes, its `Aggregate` is kept (the last `KEPT_AGGREGATES`) for workers to pull, with the
digest of the replica after it, which every worker compares with its own.

Every public method takes the lock; `wait_for_round` blocks on a condition so workers can long-poll. `submit`
(coordinator/pushes.py, how a push is judged and folded) decodes and checks an update between two short holds
of it, so a costly check holds up no other call. Anything refused raises `Rejected` and leaves the state exactly
as it was.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from compression.payload import Payload
from coordinator.base_attest import attested_base
from coordinator.checkpoint import redacted
from coordinator.deadline import DeadlinePolicy
from coordinator.deal import Deal, next_deal
from coordinator.errors import Code, Rejected
from coordinator.membership import TRANSIENT_MEMBER_FIELDS, Member, refuse_past_limit
from coordinator.phase import Phase
from coordinator.pushes import AlreadyFolded, PushHandling
from coordinator.round_record import OpenRound, RoundRecord, closed_record
from coordinator.sessions import Gate, new_session
from coordinator.validate import check_initial_state
from protocols.base import Aggregate, Protocol
from protocols.config import PROTOCOL_VERSION, RunConfig, to_yaml
from protocols.downlink import Downlink
from protocols.handshake import config_hash, handshake_problem
from protocols.local_updates import round_target_s
from protocols.replica import Replica
from protocols.round import RoundAggregator

__all__ = ["KEPT_AGGREGATES", "AlreadyFolded", "CoordinatorState", "Phase", "Snapshot"]

# Closed rounds whose aggregate stays available; a worker further behind resyncs its whole replica.
KEPT_AGGREGATES = 4


@dataclass
class Snapshot:
    """The replica as of a round, lent (`RoundAggregator.lend`): whoever reads it calls `release` once done, and
    until then the coordinator's closes step a new replica instead of this one in place."""

    round: int
    phase: Phase
    replica: Replica
    state_hash: str
    release: Callable[[], None]


class CoordinatorState(PushHandling):
    def __init__(
        self,
        cfg: RunConfig,
        protocol: Protocol[Any, Any],
        run_id: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_round: Callable[[RoundRecord, RoundAggregator], None] | None = None,
        on_join: Callable[[Member], None] | None = None,
        worker_tokens: Mapping[str, str] | None = None,
    ) -> None:
        self.cfg = cfg
        # Who may join and call (coordinator/sessions.py): the run's token, or each worker's own (`worker_tokens`:
        # name -> token, kept only as digests), then per-member sessions.
        self.gate = Gate(cfg.cluster.token, worker_tokens)
        self.protocol = protocol
        self.downlink = Downlink.of(cfg.protocol, protocol)
        self.run_id = run_id or uuid.uuid4().hex[:12]
        self.clock = clock
        self.on_round = on_round
        self.on_join = on_join  # called with every member that joined or rejoined, under the lock
        # Restored from a checkpoint: training (re)starts once a quorum of members is back, not all of them.
        self.resumed = False
        self.total_rounds = cfg.rounds
        self.members: dict[str, Member] = {}
        self.phase = Phase.WAITING
        self.round = 0
        self.aggregator: RoundAggregator | None = None
        self.state_hash = ""
        # round -> (its aggregate, digest of the replica after it), the last KEPT_AGGREGATES closed rounds,
        # and who sent which relayed update (fold order).
        self.aggregates: dict[int, tuple[Aggregate, str]] = {}
        self.senders: dict[int, list[str]] = {}
        # round -> workers whose update it folded (the open round and the kept ones): a retried push of one of
        # them is acknowledged without folding it again (push is idempotent per worker and round).
        self.folded: dict[int, set[str]] = {}
        # round -> digest of the replica when it opened (the open round and the kept ones): the base an update
        # of that round must state (`_check_base`).
        self.start_hashes: dict[int, str] = {}
        self.history: list[RoundRecord] = []
        # The one worker asked to offer the initial state, so only one dense copy crosses the wire.
        self.initializer: str | None = None
        # Digest of the frozen base weights under adapters: the first one attested (or the checkpoint's).
        self.base_digest = ""
        self._current: OpenRound | None = None
        # Elastic membership's shard deal (coordinator/deal.py), dealt anew as each round opens; None when the
        # membership is fixed (every member keeps the shard of its join index).
        self.deal: Deal | None = None
        self.deadline = DeadlinePolicy(cfg.cluster)
        # The round's target compute time for adaptive inner steps (protocols/local_updates.py); 0 = none yet.
        self.target_round_s = 0.0
        self._cond = threading.Condition()
        # The (round, phase) the WaitRound long polls were last woken at: they wait for nothing else.
        self._woken_at: tuple[int, Phase] | None = None
        # Called (under `_cond`, so quick and never blocking) when that moved: the server's waiters on its event loop.
        self.round_listeners: list[Callable[[], None]] = []
        # Guards each member's liveness (alive, left, last_seen), its heartbeat fields and its byte counters,
        # alone: heartbeats and byte counts take only this, so a fold or a round close holding `_cond` never
        # delays them. Taken after `_cond` where both are needed, never the other way round, never held long.
        self._tally = threading.Lock()
        self.config_yaml = to_yaml(redacted(cfg))  # workers have their token: never send it
        self.config_hash = config_hash(cfg)
        # Largest push accepted: before the state exists, an initial state of up to 8 GiB; after, twice
        # a dense copy of the model (no codec makes an update bigger than that) plus header slack.
        self.max_push_bytes = 8 << 30

    # ---- membership ----------------------------------------------------------------------------
    def join(self, hostname: str, token: str, protocol_version: int, requested_id: str = "",
             software_version: str = "", worker_config_hash: str = "") -> Member:
        """`join_session` without the session: for runs that authenticate nothing (no token)."""
        return self.join_session(hostname, token, protocol_version, requested_id, software_version,
                                 worker_config_hash)[0]

    def join_session(self, hostname: str, token: str, protocol_version: int, requested_id: str = "",
                     software_version: str = "", worker_config_hash: str = "") -> tuple[Member, str]:
        """A worker joins, or re-joins under its id, presenting the run's token or its own (`self.gate`); the
        handshake (protocols/handshake.py) is judged next. Returns the member and its new session credential,
        which every later call must carry (the previous one, if any, stops working)."""
        with self._cond:
            requested_id = self.gate.admit(token, requested_id)
            if protocol_version != PROTOCOL_VERSION:
                raise Rejected(
                    Code.FAILED_PRECONDITION,
                    f"protocol version {protocol_version} is not supported (coordinator speaks {PROTOCOL_VERSION})",
                )
            problem = handshake_problem(software_version, worker_config_hash, self.config_hash)
            if problem is not None:
                raise Rejected(Code.FAILED_PRECONDITION, problem)
            if self.phase is Phase.FINISHED:
                raise Rejected(Code.FAILED_PRECONDITION, "the run has finished; no new workers are accepted")
            if requested_id and requested_id in self.members:
                member = self.members[requested_id]  # a reconnect keeps its index and counters
                if self.cfg.cluster.elastic and (member.left or not member.alive):
                    # Its place may have been taken meanwhile: only max_workers members are ever here at once.
                    refuse_past_limit(self._present(), self.cfg.cluster.member_limit, requested_id, elastic=True)
                with self._tally:
                    member.alive, member.last_seen, member.hostname, member.left = True, self.clock(), hostname, False
            else:
                refuse_past_limit(self._present(), self.cfg.cluster.member_limit, requested_id,
                                  self.cfg.cluster.elastic)
                index = len(self.members)
                worker_id = requested_id or next(f"w{k}" for k in itertools.count(index) if f"w{k}" not in self.members)
                member = Member(worker_id=worker_id, index=index, hostname=hostname, last_seen=self.clock())
                self.members[worker_id] = member
            member.joins += 1
            session, member.session_digest = new_session()
            if self.on_join is not None:
                self.on_join(dataclasses.replace(member))
            if self.aggregator is None and not self._initializer_alive():
                self.initializer = member.worker_id
            self._maybe_start()
            self._wake_waiters()
            return member, session

    def _present(self) -> dict[str, bool]:
        """Every member id -> whether it is here (alive and not departed)."""
        with self._tally:
            return {w: m.alive and not m.left for w, m in self.members.items()}

    def must_offer_state(self, worker_id: str) -> bool:
        """Whether this worker is the one asked to offer the initial parameters."""
        with self._cond:
            return self.aggregator is None and self.initializer == worker_id

    def _initializer_alive(self) -> bool:
        return self.initializer is not None and self.members[self.initializer].alive

    def attest_base(self, worker_id: str, token: str, digest: str) -> str:
        """A worker's digest of its frozen base weights: the first one becomes the run's, any other is refused
        (its adapters would train against different weights, and their average would mean nothing)."""
        with self._cond:
            self._member(worker_id, token)
            self.base_digest = attested_base(worker_id, digest, self.base_digest)
            return self.base_digest

    def heartbeat(self, worker_id: str, token: str, step: int, loss: float | None, eval_loss: float | None) -> None:
        """Once training started (a phase never left), a heartbeat changes only its member's fields: it takes
        `_tally` alone, so no fold or round close delays it. Before, it may start the run, under the lock."""
        if self.phase is not Phase.WAITING:
            with self._tally:
                self._beat(self._member_tallied(worker_id, token), step, loss, eval_loss)
            return
        with self._cond:
            member = self._member(worker_id, token)
            with self._tally:
                self._beat(member, step, loss, eval_loss)
            self._maybe_start()  # a worker dropped while it was still loading may be back
            self._wake_waiters()

    def _beat(self, member: Member, step: int, loss: float | None, eval_loss: float | None) -> None:
        for name, value in (("loss", loss), ("eval_loss", eval_loss)):
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise Rejected(Code.INVALID_ARGUMENT, f"worker {member.worker_id} reported {name} {value}: a loss is "
                                                      "a finite number >= 0")
        member.last_seen, member.alive = self.clock(), True
        member.step = step
        if loss is not None:
            member.loss = loss
        if eval_loss is not None:
            member.eval_loss = eval_loss

    def attend(self, worker_id: str, token: str) -> Callable[[], None]:
        """One of this worker's calls is being served (a long poll, a pull, a push): checked as any call is, it
        proves the worker alive until it ends, so a worker waiting in it need not beat meanwhile. Returns the
        call's end, to be called once when it ends however it ends (the servicer hangs it on the call's
        termination: a killed worker's connection closes and ends its calls at once, a silent one is ended by
        the server's keepalive, `protocols.wire.servicing.server_options`); the silence counts from there."""
        with self._tally:
            member = self._member_tallied(worker_id, token)
            member.calls_open += 1
        if self.phase is Phase.WAITING:  # rare: only then does proof of life take the state lock, as `_member`
            with self._cond:
                self._maybe_back()
        ended = False

        def end() -> None:
            nonlocal ended
            with self._tally:
                if not ended:
                    ended = True
                    member.calls_open -= 1
                    member.last_seen = self.clock()

        return end

    def leave(self, worker_id: str, token: str) -> None:
        with self._cond:
            member = self._member(worker_id, token)
            with self._tally:
                member.alive, member.left = False, True
            self._maybe_close()
            self._wake_waiters()

    # ---- state -------------------------------------------------------------------------------
    def offer_initial_state(
        self, worker_id: str, token: str, payloads: dict[str, Payload], wire_bytes: int = 0, owned: bool = False
    ) -> None:
        """Install the initial state. It is decoded, checked and digested off the lock (a whole model: seconds
        on a busy machine, which heartbeats would otherwise wait for), between two holds that judge the
        offer; a second offer that lost the race meanwhile is refused as one arriving later would be. `owned`:
        the payloads' tensors are ours to keep (read off the wire), so they become the replica without a copy."""
        with self._cond:
            self._member(worker_id, token)
            if self.aggregator is not None:
                raise Rejected(Code.ALREADY_EXISTS, "the coordinator already holds the global state")
            round_ = self.round
        params = check_initial_state(worker_id, payloads)
        if not owned:  # the offerer's own tensors (in-process): the replica must not share them
            params = {name: t.clone() for name, t in params.items()}
        aggregator, digest = self._prepared(RoundAggregator(self.protocol, self.downlink, Replica(round_, params),
                                                            fold_in_order=self.cfg.cluster.fold_order == "worker",
                                                            in_place=True))
        with self._cond:
            member = self._member(worker_id, token)
            if self.aggregator is not None:
                raise Rejected(Code.ALREADY_EXISTS, "the coordinator already holds the global state")
            with self._tally:
                member.bytes_sent += wire_bytes
                member.state_sent += wire_bytes
            self._install(aggregator, digest)
            self._maybe_start()
            self._wake_waiters()

    def restore(self, replica: Replica, aggregator_state: Any, downlink_state: Any, base_digest: str = "",
                run_id: str | None = None, members: dict[str, dict[str, Any]] | None = None) -> None:
        """Resume from a checkpoint (replica, aggregator and downlink state, the run's base digest, its run id
        and membership), before any worker joins. Restored members keep their index, counters and session digest
        (their sessions go on working, no re-join needed) and count as not alive until they call again (any
        authenticated call is proof of life); training restarts once a quorum (`cluster.min_workers`) of them
        is back."""
        with self._cond:
            self.base_digest = base_digest
            self._install(*self._prepared(RoundAggregator(
                self.protocol, self.downlink, replica, aggregator_state, downlink_state, fresh=False,
                fold_in_order=self.cfg.cluster.fold_order == "worker", in_place=True)))
            self.round = replica.round
            self.resumed = True
            if run_id:
                self.run_id = run_id
            known = {f.name for f in dataclasses.fields(Member)}  # a field this version lacks is dropped
            for worker_id, fields in (members or {}).items():
                kept = {k: v for k, v in fields.items() if k in known}
                self.members[worker_id] = Member(**{**kept, "worker_id": worker_id, "alive": False,
                                                    "last_seen": self.clock()})

    def membership(self) -> dict[str, dict[str, Any]]:
        """worker id -> its index and counters: what a checkpoint keeps of the member table."""
        with self._cond, self._tally:
            return {w: {k: v for k, v in dataclasses.asdict(m).items() if k not in TRANSIENT_MEMBER_FIELDS}
                    for w, m in self.members.items()}

    def check_member(self, worker_id: str, token: str) -> None:
        with self._cond:
            self._member(worker_id, token)

    def snapshot(self, worker_id: str, token: str, resync: bool = False) -> Snapshot:
        """The whole replica, for a worker that joins (`resync` False) or whose replica fell behind or
        differed from the coordinator's (`resync` True, counted); lent: the caller releases it (`Snapshot`)."""
        with self._cond:
            self._member(worker_id, token)
            if self.aggregator is None:
                raise Rejected(Code.FAILED_PRECONDITION, "no global state yet: a worker must offer it first")
            member = self.members[worker_id]
            member.resyncs += resync
            member.pulls += 1
            return Snapshot(self.round, self.phase, self.aggregator.replica, self.state_hash, self.aggregator.lend())

    def aggregate_for(self, worker_id: str, token: str, round_: int) -> tuple[Aggregate, str, int | None]:
        """The aggregate that closed `round_`, the digest of the replica after it, and, for a relayed
        aggregate, the slot of this worker's own update (it holds that one: no need to send it back)."""
        with self._cond:
            self._member(worker_id, token)
            kept = self.aggregates.get(round_)
            if kept is None:
                raise Rejected(
                    Code.FAILED_PRECONDITION,
                    f"the aggregate of round {round_} is not available (the coordinator is at round {self.round} and "
                    f"keeps rounds {sorted(self.aggregates)}): pull the whole state instead",
                )
            aggregate, digest_after = kept
            senders = self.senders.get(round_, [])
            own = senders.index(worker_id) if aggregate.relayed and worker_id in senders else None
            return aggregate, digest_after, own

    def count_download(self, worker_id: str, nbytes: int, kind: str = "protocol") -> None:
        """`nbytes` streamed to a worker: an aggregate ("protocol") or a whole replica ("state")."""
        if kind not in ("protocol", "state"):
            raise ValueError(f"a download is 'protocol' or 'state' traffic, not {kind!r}")
        member = self.members.get(worker_id)
        if member is not None:
            with self._tally:
                member.bytes_received += nbytes
                setattr(member, f"{kind}_received", getattr(member, f"{kind}_received") + nbytes)

    def count_control(self, worker_id: str, sent: int, received: int) -> None:
        """A control call's bytes: `sent` by the worker (its request), `received` by it (the reply)."""
        member = self.members.get(worker_id)
        if member is not None:
            with self._tally:
                member.bytes_sent += sent
                member.bytes_received += received
                member.control_sent += sent
                member.control_received += received

    # ---- time --------------------------------------------------------------------------------
    def tick(self) -> None:
        """Drop workers whose heartbeats stopped; close a round whose deadline passed with a quorum."""
        with self._cond:
            with self._tally:
                now = self.clock()
                for member in self.members.values():
                    if (member.alive and not member.calls_open
                            and now - member.last_seen > self.cfg.cluster.heartbeat_timeout_s):
                        member.alive = False
            self._maybe_close()
            self._wake_waiters()

    def wait_for_round(self, after_round: int, timeout: float) -> tuple[int, Phase, str]:
        """Block until the round is past `after_round`, the run finished, or `timeout` passed."""
        if not (math.isfinite(timeout) and timeout >= 0):
            raise Rejected(Code.INVALID_ARGUMENT, f"a wait must be a finite number of seconds >= 0, got {timeout}")
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

    def wait_for_round_dealt(self, worker_id: str, after_round: int, timeout: float
                             ) -> tuple[int, Phase, str, tuple[int, int, int]]:
        """`wait_for_round`, and this worker's `shard_for` in the round it returns (read under the same lock)."""
        with self._cond:
            return (*self.wait_for_round(after_round, timeout), self.shard_for(worker_id))

    def if_unlocked(self, fn: Callable[..., Any], *args: Any) -> tuple[bool, Any]:
        """(True, fn(*args)) when the state lock is free this instant, taken without waiting; else (False, None).
        For a caller that must never wait for a fold or a round close (the server's event loop): it then runs `fn`
        where waiting is allowed. `fn` is one of this class's quick reads, which take the lock again (reentrant)."""
        if not self._cond.acquire(blocking=False):
            return False, None
        try:
            return True, fn(*args)
        finally:
            self._cond.release()

    def members_copy(self) -> list[Member]:
        """A consistent copy of the member table, for progress displays and summaries."""
        with self._cond, self._tally:
            return [dataclasses.replace(m) for m in self.members.values()]

    def live_members(self) -> list[Member]:
        with self._cond:
            return [m for m in self.members.values() if m.alive]

    # ---- internals ---------------------------------------------------------------------------
    def _wake_waiters(self) -> None:
        """Wake the `wait_for_round` callers (under `_cond`) if what they wait for moved: the round or the phase.
        Waking them on every change instead (each fold, join, tick) woke every worker already waiting for the
        round to close at each later push, N^2/2 wakeups a round, each taking this lock in turn: at 1,000
        workers that convoy, not the pushes' own work, set the pace. A thread waiting in `wait_for_round` also
        looks again every second; the server's WaitRound coroutines wait for `round_listeners` alone
        (coordinator/round_signal.py)."""
        now = (self.round, self.phase)
        if now != self._woken_at:
            self._woken_at = now
            self._cond.notify_all()
            for listener in self.round_listeners:
                listener()

    def _member(self, worker_id: str, token: str) -> Member:
        """The calling worker, `token` its session (a run that authenticates refuses an unknown id as
        UNAUTHENTICATED, telling a stranger nothing); any authenticated call is proof of life."""
        with self._tally:
            member = self._member_tallied(worker_id, token)
        self._maybe_back()
        return member

    def _maybe_back(self) -> None:
        """After a member proved itself alive (under `_cond`): a resumed run may now have its quorum."""
        if self.phase is Phase.WAITING and self.resumed:  # a restored member is back: maybe the quorum too
            self._maybe_start()
            self._wake_waiters()

    def _member_tallied(self, worker_id: str, token: str) -> Member:
        """`_member`'s checks and proof of life, under `_tally` (a member only ever leaves under it)."""
        member = self.members.get(worker_id)
        self.gate.check_session(token, member.session_digest if member is not None else "", worker_id)
        if member is None:
            raise Rejected(Code.NOT_FOUND, f"unknown worker id {worker_id[:64]!r}: join first")
        if member.left:  # NOT_FOUND: the client re-joins under its id if it still means to take part
            raise Rejected(Code.NOT_FOUND, f"worker {worker_id} left the run: join again to take part")
        member.last_seen, member.alive = self.clock(), True
        return member

    def _prepared(self, aggregator: RoundAggregator) -> tuple[RoundAggregator, str]:
        """`aggregator` with the run's bound on updates, and its replica's digest: ready for `_install`. Touches
        nothing of the state, so it may run off the lock."""
        aggregator.bound_updates(self.cfg.cluster.max_update_ratio)
        return aggregator, aggregator.replica.digest()

    def _install(self, aggregator: RoundAggregator, digest: str) -> None:
        self.aggregator = aggregator
        self.state_hash = digest
        params = aggregator.replica.params
        self.max_push_bytes = 2 * sum(t.numel() * t.element_size() for t in params.values()) + (16 << 20)

    def _open_round(self) -> None:
        self._current = OpenRound(self.round, self.clock())
        self.start_hashes[self.round] = self.state_hash
        if self.cfg.cluster.elastic:
            with self._tally:
                here = [(m.index, m.worker_id) for m in self.members.values() if m.alive and not m.left]
            self.deal = next_deal(self.deal, self.round, here)

    def shard_for(self, worker_id: str) -> tuple[int, int, int]:
        """(membership epoch, shard index, shard count) of this worker in the open round under elastic
        membership (index NOT_DEALT: it joined while the round was open and sits it out); (0, 0, 0) with a
        fixed membership, where a worker keeps its join index's shard."""
        with self._cond:
            deal = self.deal
            if deal is None:
                return 0, 0, 0
            return deal.since, deal.shard_of(worker_id), len(deal.members)

    def _live_reported(self, reported: Mapping[str, Any]) -> bool:
        """Whether every live member the open round was dealt to has reported. Called after every fold: it stops at
        the first live member still to report, where building the sets of both (as it did) cost every push a pass
        over all the members, the square of the workers a round."""
        return all(m.worker_id in reported for m in self.members.values()
                   if m.alive and (self.deal is None or m.worker_id in self.deal))

    def _maybe_start(self) -> None:
        if self.phase is not Phase.WAITING or self.aggregator is None:
            return
        needed = self.cfg.cluster.quorum if self.resumed else self.cfg.cluster.workers
        if sum(m.alive for m in self.members.values()) < needed:
            return
        if self.round >= self.total_rounds:
            self.phase = Phase.FINISHED
            return
        self.phase = Phase.TRAINING
        self._open_round()

    def _maybe_close(self) -> None:
        current = self._current
        if self.phase is not Phase.TRAINING or current is None or self.aggregator is None:
            return
        reported = current.reported
        if not reported or len(reported) < self.cfg.cluster.quorum:
            return  # neither way closes a round short of its quorum
        if self._live_reported(reported):
            # Every live worker dealt into the round, and at least the quorum: lapsed heartbeats cannot bypass it.
            closed_by = "all"
        elif self.clock() - current.started >= self.deadline.deadline_s():
            closed_by = "deadline"
        else:
            return
        aggregate = self.aggregator.close()
        self.state_hash = self.aggregator.replica.digest()
        self.aggregates[current.number] = (aggregate, self.state_hash)
        self.senders[current.number] = self.aggregator.last_fold_order
        for old in sorted(self.aggregates)[:-KEPT_AGGREGATES]:
            del self.aggregates[old]
            self.senders.pop(old, None)
            self.folded.pop(old, None)
            self.start_hashes.pop(old, None)
        with self._tally:  # the byte counters, consistent across members
            record = closed_record(current, list(self.members.values()), closed_by, aggregate.nbytes(),
                                   self.clock() - current.started, self.deadline.deadline_s())
        self.history.append(record)
        self.deadline.observe(current.quorum_s)
        self.target_round_s = round_target_s(self.cfg.inner_steps,
                                             (m.get("step_s", 0.0) for m in current.reported.values()))
        self.round += 1
        if self.on_round is not None:
            self.on_round(record, self.aggregator)
        if self.round >= self.total_rounds:
            self.phase, self._current = Phase.FINISHED, None
        else:
            self._open_round()
