"""The one round loop every coordinated protocol runs, over any transport.

Round r: load the replica's parameters, H inner steps, `make_update`, hand the update to the transport,
apply the round's aggregate to the replica with the same pure code the aggregator used, and compare the
replica's digest with the aggregator's. A mismatch, a round the worker missed, or joining late is the
only time the whole replica moves (`Transport.resync`); each is counted.
"""

from __future__ import annotations

import copy
import logging
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from protocols.arrival import outer_shift
from protocols.base import Protocol, Update
from protocols.downlink import Downlink, apply_aggregate
from protocols.local_updates import adapted_inner_steps
from protocols.replica import Params, Replica
from worker.faults import Faults
from worker.optimizers import optimizer_state_bytes
from worker.session import Session
from worker.trainer import params_digest
from worker.transports.base import Handle, RoundResult, RoundStatus, Transport

log = logging.getLogger(__name__)
Progress = Callable[[dict[str, Any]], None]


@dataclass
class WorkerResult:
    worker_id: str
    rounds: int = 0
    steps: int = 0
    tokens: int = 0
    final_eval_loss: float | None = None
    bytes_sent: int = 0
    bytes_received: int = 0
    bytes_total: int = 0
    # bytes_sent / bytes_received split into protocol, control and state traffic (worker/traffic.py)
    traffic: dict[str, int] = field(default_factory=dict)
    stale_updates: int = 0  # updates that arrived after their round closed (dropped, or folded late)
    late_folded: int = 0  # of those, folded weighted down into a later round (`cluster.late: stale`)
    dropped_tokens: int = 0  # tokens trained for updates that were dropped (in no aggregate)
    slowdown: float = 1.0  # the straggler factor this worker ran under (faults.stragglers)
    steps_per_round: list[int] = field(default_factory=list)  # inner steps run each round (adaptive: fewer)
    # On arrival: after how many of each round's inner steps the previous round's aggregate was merged.
    merged_after_steps: list[int] = field(default_factory=list)
    # Elastic membership: {round, epoch, shard, shards, plays} each time this worker was dealt a new shard, and
    # the rounds it sat out (it joined while they were open).
    deals: list[dict[str, Any]] = field(default_factory=list)
    sat_out: list[int] = field(default_factory=list)
    resyncs: int = 0  # whole replicas pulled after the start
    state_hashes: list[str] = field(default_factory=list)  # the replica's digest after every round
    param_hash: str = ""  # params_digest of the final replica's parameters
    evals: list[dict[str, Any]] = field(default_factory=list)
    round_seconds: list[float] = field(default_factory=list)  # each round: train, exchange, apply, check
    compute_seconds: list[float] = field(default_factory=list)  # each round: inner steps and make_update
    blocked_seconds: list[float] = field(default_factory=list)  # each round: waiting for an aggregate
    # One row a round, from one hand-off of an update to the next (see `RoundLoop._span`): wall_s,
    # compute_s, blocked_s, comm_s, utilization. The same rows go to the aggregator with the update.
    spans: list[dict[str, float]] = field(default_factory=list)
    train_s: float = 0.0  # from the first round's start to the last aggregate applied (evaluation excluded)
    wall_s: float = 0.0
    # What the worker trains and what it costs it: the frozen base's digest at the end ("" when every weight
    # trains), trainable parameters, the inner optimizer's state, and the process's peak resident memory
    # (a worker thread of an in-process run shares its process's).
    base_hash: str = ""
    trainable_params: int = 0
    optimizer_state_bytes: int = 0
    peak_rss_bytes: int = 0


def peak_rss_bytes() -> int:
    """This process's peak resident set size: VmHWM, not `ru_maxrss`, which a spawned child inherits from the
    parent it was forked from (every rank of a spawned job then reports at least the launcher's peak)."""
    try:
        with open("/proc/self/status") as status:
            lines = status.read().splitlines()
        for line in lines:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:  # not Linux
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kibibytes on Linux


@dataclass(frozen=True)
class _Pending:
    """An overlapped round whose exchange is in flight."""

    round: int
    handle: Handle[RoundResult]
    update: Update


@dataclass
class _Arriving:
    """On arrival (`overlap.mode: on_arrival`): the round whose exchange is in flight while the next one trains,
    and the replica and worker state the next round's update will be made against once it is merged."""

    pending: _Pending
    replica: Replica
    state: Any
    delay_steps: int | None  # merge after exactly this many inner steps; None: after the step it arrived in
    merged: bool = False
    spent_s: float = 0.0  # waiting for it and merging it: neither compute nor the next round's training
    blocked_s: float = 0.0

    def due(self, steps_done: int) -> bool:
        if self.merged:
            return False
        if self.delay_steps is None:
            return self.pending.handle.done()
        return steps_done >= self.delay_steps


class RoundLoop:
    """Runs one worker's rounds: `run()` until the aggregator says the run is finished."""

    def __init__(
        self,
        session: Session,
        transport: Transport,
        protocol: Protocol[Any, Any],
        progress: Progress | None = None,
        faults: Faults | None = None,
    ) -> None:
        self.session, self.transport, self.protocol = session, transport, protocol
        self.downlink = Downlink.of(session.cfg.protocol, protocol)
        self.progress, self.faults = progress, faults or Faults()
        cfg = session.cfg
        slowdown = cfg.faults.slowdown(session.index, session.workers, cfg.seed)
        if slowdown != 1.0 and self.faults.slowdown == 1.0:  # an explicit Faults(slowdown=...) wins
            self.faults = replace(self.faults, slowdown=slowdown)
        self.adaptive = bool(getattr(cfg.protocol, "adaptive_inner_steps", False))
        self.step_s = 0.0  # this worker's seconds per inner step, measured and smoothed (slowdown included)
        self.result = WorkerResult(worker_id=transport.worker_id, slowdown=self.faults.slowdown)
        self._digested: Replica | None = None
        self._last_digest = ""
        self._span_began = time.perf_counter()
        self._span_blocked = self._span_comm = 0.0
        self._evaluating_s = 0.0  # evaluations inside rounds, left out of train_s and of the spans
        self._round_tokens: dict[int, int] = {}  # tokens of each round whose outcome is still to come

    def _digest(self, replica: Replica) -> str:
        """The replica's digest, hashed once per replica object (a round compares it up to three times)."""
        if self._digested is not replica:
            self._digested, self._last_digest = replica, replica.digest()
        return self._last_digest

    def _resync(self, why: str) -> Replica:
        log.warning("%s resyncs its replica: %s", self.transport.worker_id, why)
        self.result.resyncs += 1
        return self.transport.resync()

    def _eval_point(self, round_: int, eval_loss: float) -> None:
        s = self.session
        self.result.evals.append({
            "round": round_, "step": s.trainer.step_count,
            "tokens_total": s.trainer.step_count * s.tokens_per_step * s.workers, "eval_loss": eval_loss,
            "bytes_sent": self.transport.bytes_sent, "bytes_received": self.transport.bytes_received,
        })

    def run(self) -> WorkerResult:
        session, transport, protocol, result = self.session, self.transport, self.protocol, self.result
        replica = transport.start(session.params(), session.base_digest())
        result.worker_id = transport.worker_id
        # Joining a run already under way (late, or restarted): the LR schedule goes on from the global step.
        session.continue_from(replica.round)
        state = protocol.init_worker_state(replica.params)
        self._span_began = began = time.perf_counter()
        if protocol.overlapped:
            replica, status = self._run_overlapped(replica, state)
        elif protocol.merges_on_arrival:
            replica, status = self._run_on_arrival(replica, state)
        else:
            replica, status = self._run_synchronous(replica, state)
        result.train_s = time.perf_counter() - began - self._evaluating_s
        if status.state_hash and self._digest(replica) != status.state_hash:
            replica = self._resync("the final replica differs from the aggregator's")
        session.trainer.load_params(replica.params)
        result.final_eval_loss = session.evaluate() if session.eval_batches else None
        if result.final_eval_loss is not None:
            self._eval_point(replica.round, result.final_eval_loss)
        transport.report(session.trainer.step_count, None, result.final_eval_loss)
        self.final_replica = replica
        result.param_hash = params_digest(replica.params)
        return result

    def _run_synchronous(self, replica: Replica, state: Any) -> tuple[Replica, RoundStatus]:
        """Round r trains from the replica of round r and waits for round r's aggregate before round r+1."""
        while True:
            status = self.transport.status(replica.round - 1)
            if status.finished:
                return replica, status
            if status.round != replica.round:
                replica = self._resync(f"the run is at round {status.round}, the replica at {replica.round}")
                continue
            if status.state_hash and status.state_hash != self._digest(replica):
                replica = self._resync(f"the replica at round {replica.round} differs from the aggregator's")
                continue
            if not self._take_deal(replica.round):  # joined mid-round (elastic): dealt into the next one
                self.result.sat_out.append(replica.round)
                self.session.continue_from(self.transport.status(replica.round).round)
                continue
            began = time.perf_counter()
            before = copy.deepcopy(state)  # a refused update leaves the error feedback as if it was never made
            handle, state, compute_s, _ = self._train(replica.round, replica, replica.params, state)
            waited = time.perf_counter()
            outcome = self._await(handle)
            if not (outcome.accepted or outcome.folded_late):
                state = before
            replica = self._absorb(replica.round, outcome, replica)
            self._account(began, compute_s, time.perf_counter() - waited)

    def _take_deal(self, round_: int) -> bool:
        """Train round `round_` on the shard the aggregator dealt this worker (elastic membership: re-shard when
        the deal moved); False when it dealt none (the worker joined while the round was open)."""
        epoch, shard, shards = self.transport.deal
        if shards == 0:  # a fixed membership: the join index's shard, for the whole run
            return True
        if shard < 0:
            return False
        if self.session.deal != (epoch, shard, shards):
            plays = self.session.reshard(epoch, shard, shards)
            self.result.deals.append({"round": round_, "epoch": epoch, "shard": shard, "shards": shards,
                                      "plays": list(plays)})
        return True

    def _run_overlapped(self, replica: Replica, state: Any) -> tuple[Replica, RoundStatus]:
        """CO2: round t's exchange runs while round t+1 trains. Round t trains from the replica that has every
        aggregate up to round t-2 applied; at its end the replica applies round t-1's aggregate (the wait
        for it is the only blocking). The first round after joining has no aggregate to apply, as in the
        paper's first round. A refused (stale) update is taken back into the error feedback
        (`Protocol.withdraw`) after the next round's update was made, so what it carried is sent later.
        A straggler that fell so far behind that it resynced the whole replica goes on at the open round, as
        after joining (the outcomes of its older rounds are then already in the replica).

        Eager (`overlap.eager`): round t+1 starts from the replica nudged by this worker's own round-t
        update in place of its stale share (`AveragingProtocol.eager_start`); the replica itself, and so
        its digest, stays the one every worker and the aggregator share."""
        status = self.transport.status(replica.round - 1)
        if status.round != replica.round and not status.finished:
            replica = self._resync(f"the run is at round {status.round}, the replica at {replica.round}")
        round_ = status.round
        pending: _Pending | None = None  # the round in flight: its number, handle and the update it carries
        fresh: Update | None = None  # this worker's update of the round before, and the one before that
        stale: Update | None = None
        while round_ < self.session.cfg.rounds:
            began = time.perf_counter()
            start = replica.params
            if self.protocol.eager and fresh is not None:
                start = self.protocol.eager_start(replica.params, fresh, stale, self.session.workers)
            handle, state, compute_s, update = self._train(round_, replica, start, state)
            stale, fresh = fresh, update
            waited = time.perf_counter()
            if pending is not None:
                replica, state = self._absorb_withdrawing(pending, replica, state)
            self._account(began, compute_s, time.perf_counter() - waited)
            pending = _Pending(round_, handle, update)
            if replica.round > round_:  # a straggler resynced past its rounds: it goes on at the open round
                round_, fresh, stale = replica.round, None, None
            else:
                round_ += 1
        if pending is not None:
            replica, state = self._absorb_withdrawing(pending, replica, state)
        return replica, self.transport.status(replica.round - 1)

    def _run_on_arrival(self, replica: Replica, state: Any) -> tuple[Replica, RoundStatus]:
        """On arrival (Streaming DiLoCo's overlap, protocols/arrival.py): round t's exchange runs while round t+1
        takes its first inner steps from the replica of round t; when round t's aggregate arrives (or after
        exactly `overlap.delay_steps` steps, waiting for it there if late) the replica steps as in a synchronous
        round and the local weights move by the same step, and round t+1's update is made against that replica.
        So the aggregator sees a synchronous worker; only the last round's wait is not hidden."""
        status = self.transport.status(replica.round - 1)
        if status.round != replica.round and not status.finished:
            replica = self._resync(f"the run is at round {status.round}, the replica at {replica.round}")
        round_ = replica.round
        delay = self.protocol.arrival_delay_steps
        arriving: _Arriving | None = None
        while round_ < self.session.cfg.rounds:
            began = time.perf_counter()
            handle, state, compute_s, update = self._train(round_, replica, replica.params, state, arriving)
            blocked = 0.0
            if arriving is not None:
                replica, blocked = arriving.replica, arriving.blocked_s
            self._account(began, compute_s, blocked)
            arriving = _Arriving(_Pending(round_, handle, update), replica, state, delay)
            round_ = max(round_ + 1, replica.round)  # a resync past its rounds: on at the open round
        if arriving is not None:
            self._merge(arriving, into="none")
            replica = arriving.replica
        return replica, self.transport.status(replica.round - 1)

    def _merge(self, arriving: _Arriving, into: str = "shift") -> None:
        """Wait for the round in flight, apply its aggregate to the replica and move the local weights by the
        replica's step (`into` "shift"; "load": no inner step taken yet, so the weights simply become the new
        replica's, bit for bit as in a synchronous round; "none": after the last round); a refused update goes
        back into the worker state."""
        began = time.perf_counter()
        outcome = self._await(arriving.pending.handle)
        arriving.blocked_s = time.perf_counter() - began
        if not (outcome.accepted or outcome.folded_late):
            arriving.state = self.protocol.withdraw(arriving.pending.update, arriving.state)
        before = arriving.replica
        arriving.replica = self._absorb(arriving.pending.round, outcome, before)
        if into == "load":
            self.session.trainer.load_params(arriving.replica.params)
        elif into == "shift" and arriving.replica is not before:
            self.session.trainer.shift_params(outer_shift(before.params, arriving.replica.params))
        arriving.merged = True
        arriving.spent_s += time.perf_counter() - began

    def _absorb_withdrawing(self, pending: _Pending, replica: Replica,
                            state: Any) -> tuple[Replica, Any]:
        """Absorb an overlapped round's outcome; a refused update goes back into the worker state."""
        outcome = self._await(pending.handle)
        if not (outcome.accepted or outcome.folded_late):
            state = self.protocol.withdraw(pending.update, state)
        return self._absorb(pending.round, outcome, replica), state

    def _await(self, handle: Handle[RoundResult]) -> RoundResult:
        """An exchange's result; the wait is blocked time and the exchange's duration communication time,
        both counted in the span the wait falls in."""
        waited = time.perf_counter()
        outcome = handle.result()
        self._span_blocked += time.perf_counter() - waited
        self._span_comm += handle.seconds
        return outcome

    def _span(self, round_: int, compute_s: float) -> dict[str, float]:
        """Round `round_`'s span: from the previous hand-off of an update to this one. It holds this round's
        compute, and the wait for (and the duration of) the exchange awaited since the last hand-off: in a
        synchronous run the previous round's, in an overlapped one the round before that. The wait after
        the last hand-off is outside every span (it is in `train_s`)."""
        now = time.perf_counter()
        wall = max(now - self._span_began, 1e-9)
        span = {"round": float(round_), "wall_s": wall, "compute_s": compute_s, "blocked_s": self._span_blocked,
                "comm_s": self._span_comm, "utilization": min(compute_s / wall, 1.0)}
        self._span_began, self._span_blocked, self._span_comm = now, 0.0, 0.0
        return span

    def _train(self, round_: int, replica: Replica, start: Params, state: Any, arriving: _Arriving | None = None
               ) -> tuple[Handle[RoundResult], Any, float, Update]:
        """Round `round_`'s inner steps from `start` (the replica's parameters, or eager's nudge of them);
        its update handed to the transport. (handle, the worker's next state, seconds of compute, update).
        With the previous round `arriving`, its aggregate is merged between two inner steps, and the update made
        against the replica and state it leaves (`arriving.replica`, `arriving.state`)."""
        session, transport, result = self.session, self.transport, self.result
        began = time.perf_counter()
        session.trainer.load_params(start)
        metrics: dict[str, float] = {}
        if session.eval_batches and session.eval_due(round_):
            metrics["eval_loss"] = session.evaluate()
            self._eval_point(round_, metrics["eval_loss"])
            evaluated = time.perf_counter() - began
            began += evaluated  # evaluation is neither compute nor communication: left out of the span
            self._span_began += evaluated
            self._evaluating_s += evaluated
        steps = session.steps_in_round(round_)
        if self.adaptive:  # dynamic local updates: as many steps as fit in the round's target time
            steps = adapted_inner_steps(steps, transport.target_round_s, self.step_s)
        losses = []
        stepping = time.perf_counter()
        for done in range(steps):
            if arriving is not None and arriving.due(done):
                self._merge(arriving, into="load" if done == 0 else "shift")
                result.merged_after_steps.append(done)
            self.faults.before_step(session.trainer.step_count)
            step_began = time.perf_counter()
            losses.append(session.trainer.step())
            self.faults.after_step(time.perf_counter() - step_began)
            transport.report(session.trainer.step_count, losses[-1], None)
        if arriving is not None:
            if not arriving.merged:  # not there by the round's end: the only wait
                self._merge(arriving, into="load" if steps == 0 else "shift")
                result.merged_after_steps.append(steps)
            replica, start, state = arriving.replica, arriving.replica.params, arriving.state
            began += arriving.spent_s
            stepping += arriving.spent_s
        if steps:  # smoothed over rounds (half each): a noisy round moves this worker's step count less
            measured = (time.perf_counter() - stepping) / steps
            self.step_s = measured if self.step_s <= 0 else (self.step_s + measured) / 2
        update, state = self.protocol.make_update(session.params(), start, state)
        # Tied to the state it was computed against (the replica; eager's nudged start is derived from it).
        update = replace(self.faults.corrupt_update(update), base=self._digest(replica))
        tokens = steps * session.tokens_per_step
        if self.adaptive and tokens:  # token-weighted averaging (protocols/local_updates.py)
            update = replace(update, weight=float(tokens))
        compute_s = time.perf_counter() - began
        metrics.update(train_loss=sum(losses) / max(len(losses), 1), tokens=float(tokens))
        if steps:
            metrics["step_s"] = self.step_s
        if arriving is not None:  # on arrival: after how many of this round's steps the last aggregate came in
            metrics["merged_after_steps"] = float(result.merged_after_steps[-1])
        span = self._span(round_, compute_s)
        result.spans.append(span)
        metrics.update({k: v for k, v in span.items() if k != "round"})
        handle = transport.exchange(round_, update, metrics)
        result.rounds += 1
        result.steps_per_round.append(steps)
        result.steps += steps
        result.tokens += tokens
        self._round_tokens[round_] = tokens
        if self.progress is not None:
            self.progress({"worker": transport.worker_id, "round": round_, "step": session.trainer.step_count,
                           **metrics})
        return handle, state, compute_s, update

    def _absorb(self, round_: int, outcome: RoundResult, replica: Replica) -> Replica:
        """The replica after round `round_`'s outcome: its aggregate applied and checked by digest."""
        tokens = self._round_tokens.pop(round_, 0)
        if not outcome.accepted:
            self.result.stale_updates += 1
            self.result.late_folded += outcome.folded_late
            self.result.dropped_tokens += 0 if outcome.folded_late else tokens
        if replica.round > round_:
            pass  # a resync already brought the replica past this round (an overlapped straggler)
        elif outcome.aggregate is None:
            replica = self._resync(f"the aggregate of round {round_} is no longer available")
        elif replica.round < round_:
            replica = self._resync(f"the replica is at round {replica.round}, behind round {round_}'s aggregate")
        else:
            replica = self.faults.after_apply(apply_aggregate(self.protocol, self.downlink, outcome.aggregate, replica))
            if self._digest(replica) != outcome.state_hash:
                replica = self._resync(f"the replica after round {round_} differs from the aggregator's")
        self.result.state_hashes.append(self._digest(replica))
        return replica

    def _account(self, began: float, compute_s: float, blocked_s: float) -> None:
        """One round's times: wall, compute (inner steps and the update), blocked on the exchange."""
        self.result.round_seconds.append(time.perf_counter() - began)
        self.result.compute_seconds.append(compute_s)
        self.result.blocked_seconds.append(blocked_s)

    def finish(self) -> WorkerResult:
        """Fill in the byte counters and wall time (call once the transport is closed)."""
        r = self.result
        r.bytes_sent, r.bytes_received = self.transport.bytes_sent, self.transport.bytes_received
        r.bytes_total = r.bytes_sent + r.bytes_received
        r.traffic = self.transport.traffic.as_dict()
        r.wall_s = time.monotonic() - self.session.started
        r.base_hash = self.session.base_digest()
        r.trainable_params = sum(t.numel() for t in self.session.params().values())
        r.optimizer_state_bytes = optimizer_state_bytes(self.session.trainer.optimizer)
        r.peak_rss_bytes = peak_rss_bytes()
        return r
