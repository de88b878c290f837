"""One coordinated run, without its transport: the state machine, the run directory, a liveness ticker,
progress and the summary.

Resuming (`resume`: a run directory or its checkpoint.pt) continues the same run: the checkpoint is read
and checked against the config before anything is written (coordinator/checkpoint.py), then the run id,
the replica, the aggregator's and the downlink's state and the membership are restored, and the run
directory the checkpoint lives in is appended to. `halt` stops persisting, after the checkpoint being
written (if any) is complete, so a SIGTERM never leaves a round half-recorded.

`CoordinatorServer` (coordinator/server.py) puts a gRPC server in front of it; the in-process transport
(`deploy/inproc.py`) uses it as it is.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from coordinator.checkpoint import ResumePoint, check_worker_tokens, load_resume_point, state_digest
from coordinator.membership import Member
from coordinator.recorder import ClosedRound, RoundRecorder
from coordinator.round_record import RoundRecord
from coordinator.rundir import RunDir
from coordinator.state import CoordinatorState, Phase
from coordinator.tensorboard import tensorboard_listener
from coordinator.traffic import traffic_of, traffic_per_worker
from protocols.config import RunConfig
from protocols.registry import build_protocol
from protocols.round import RoundAggregator

log = logging.getLogger(__name__)


class CoordinatorRun:
    def __init__(self, cfg: RunConfig, run_dir: str | Path | None = None,
                 resume: str | Path | ResumePoint | None = None, worker_tokens: dict[str, str] | None = None) -> None:
        """`run_dir`: where a fresh run writes; a resumed run writes where its checkpoint is, and refuses
        (ConfigError, nothing written) a checkpoint that is missing, foreign, finished or of another config, or
        one of a run that had worker tokens when none are given. `worker_tokens`: name -> that worker's own
        token (coordinator/sessions.py); only their digests are kept, and the run directory records only that
        the run had some."""
        self.cfg = cfg
        point = resume if isinstance(resume, ResumePoint) or resume is None else load_resume_point(resume, cfg)
        if point is not None:
            check_worker_tokens(point, bool(worker_tokens))
        if point is not None and run_dir is not None:
            run_dir = point.run_dir
        self.run_dir = RunDir(run_dir, cfg, resume=point) if run_dir is not None else None
        if self.run_dir is not None:
            self.run_dir.worker_tokens = bool(worker_tokens)
        # Called with every closed round's record (e.g. `lowband coordinator`'s plain line per round).
        self.round_listeners: list[Callable[[RoundRecord], None]] = []
        self.state = CoordinatorState(cfg, build_protocol(cfg), on_round=self._on_round, on_join=self._on_join,
                                      worker_tokens=worker_tokens)
        scalars = tensorboard_listener(self.run_dir.path, self.state) if self.run_dir is not None else None
        if scalars is not None:
            self.round_listeners.append(scalars)
        self._io = threading.Lock()  # held while a round is recorded: `halt` waits for a checkpoint in progress
        self.recorder = RoundRecorder(self._record)  # writes closed rounds off the state lock
        self._halted = False
        self.elapsed_before = 0.0  # wall seconds of the run before this process resumed it
        self.resumed_from: dict[str, Any] | None = None
        if point is not None:
            self._restore(point)
        self._recorded = self.state.round  # rounds recorded (checkpoint and metrics row), resumed ones included
        self.started = time.monotonic()
        self._stop = threading.Event()
        self._ticker = threading.Thread(target=self._tick, daemon=True, name="lowband-ticker")

    def _restore(self, point: ResumePoint) -> None:
        ckpt = point.checkpoint
        self.state.restore(ckpt["replica"], ckpt["aggregator_state"], ckpt["downlink_state"],
                           ckpt.get("base_digest", ""), run_id=point.run_id, members=ckpt["members"])
        self.elapsed_before = float(ckpt.get("elapsed_s", 0.0))
        aggregator = self.state.aggregator
        assert aggregator is not None  # restore installed it
        # What was loaded, by digest: a test (or an operator) compares it with the checkpoint on disk.
        self.resumed_from = {"checkpoint": str(point.path), "round": self.state.round, "run_id": self.state.run_id,
                             "replica_digest": aggregator.replica.digest(),
                             "aggregator_state_digest": state_digest(aggregator.state),
                             "downlink_state_digest": state_digest(aggregator.downlink_state),
                             "members": sorted(ckpt["members"])}
        if self.run_dir is not None:
            self.run_dir.log("resume", **self.resumed_from)
        log.info("resumed run %s from %s at round %d", self.state.run_id, point.path, self.state.round)

    def halt(self) -> None:
        """Stop recording rounds: waits for a checkpoint being written, then no round is recorded any more
        (what the run directory holds is then final: the checkpoint and its metrics row agree)."""
        with self._io:
            self._halted = True

    def start_ticker(self) -> None:
        self._ticker.start()

    def stop_ticker(self) -> None:
        self._stop.set()

    def wait_finished(self, timeout: float | None = None) -> bool:
        """Block until the last round closed (or `timeout` seconds passed)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.state.phase is not Phase.FINISHED:
            if deadline is not None and time.monotonic() > deadline:
                return False
            self.state.wait_for_round(self.state.round, 1.0)
        self.recorder.flush()  # the last round's checkpoint and metrics row are on disk
        return True

    def wait_departed(self, timeout: float) -> None:
        """After the run finished: give workers `timeout` seconds to report their final eval and leave."""
        deadline = time.monotonic() + timeout
        while self.state.live_members() and time.monotonic() < deadline:
            time.sleep(0.05)

    def progress(self) -> dict[str, Any]:
        members = {m.worker_id: {k: v for k, v in asdict(m).items() if k != "session_digest"}
                   for m in self.state.members_copy()}
        history = list(self.state.history)
        return {
            "round": self.state.round,
            "rounds": self.state.total_rounds,
            "phase": self.state.phase.value,
            "workers": members,
            "last": asdict(history[-1]) if history else None,
        }

    def summary(self) -> dict[str, Any]:
        """The run so far; `rounds` counts the rounds recorded (after `halt`, those the checkpoint holds)."""
        self.recorder.flush()
        members = self.state.members_copy()
        finals = [m.eval_loss for m in members if m.eval_loss is not None]
        n = max(len(members), 1)
        return {
            "name": self.cfg.name,
            "run_id": self.state.run_id,
            "protocol": self.cfg.protocol.kind,
            "rounds": self._recorded,
            "final_eval_loss": sum(finals) / len(finals) if finals else None,
            "tokens": sum(m.tokens for m in members),
            "wall_s": self.elapsed_before + time.monotonic() - self.started,
            "bytes_sent_per_worker": sum(m.bytes_sent for m in members) / n,
            "bytes_received_per_worker": sum(m.bytes_received for m in members) / n,
            "bytes_total_per_worker": sum(m.bytes_sent + m.bytes_received for m in members) / n,
            # The same bytes split into protocol, control and state traffic (coordinator/traffic.py), per worker.
            "traffic_per_worker": traffic_per_worker([traffic_of(m) for m in members]),
            "resyncs": sum(m.resyncs for m in members),
            "state_hash": self.state.state_hash,
            "base_digest": self.state.base_digest,
            "workers": {
                m.worker_id: {"bytes_sent": m.bytes_sent, "bytes_received": m.bytes_received,
                              "bytes_total": m.bytes_sent + m.bytes_received, "tokens": m.tokens,
                              "resyncs": m.resyncs, "alive": m.alive, "index": m.index, "joins": m.joins,
                              "traffic": traffic_of(m)}
                for m in members
            },
        }

    def _on_round(self, record: RoundRecord, aggregator: RoundAggregator) -> None:
        """A round closed (called under the state lock): hand what it closed with to the recorder, which writes
        it off the lock, so a slow checkpoint holds up no heartbeat or push."""
        self.recorder.put(ClosedRound(record, aggregator.replica, aggregator.state, aggregator.downlink_state,
                                      self.state.membership(), self.elapsed_before + time.monotonic() - self.started,
                                      release=aggregator.lend()))

    def _record(self, closed: ClosedRound) -> None:
        """Record a closed round: the checkpoint first, then its metrics row (a crash between the two is
        mended on resume from the record the checkpoint carries, so each round is logged exactly once)."""
        record = closed.record
        with self._io:
            if self._halted:
                return
            for listener in self.round_listeners:
                listener(record)
            if self.run_dir is not None:
                self.run_dir.save_checkpoint(
                    closed.replica, closed.aggregator_state, closed.downlink_state, self.state.run_id,
                    self.state.base_digest, members=closed.members, record=record, elapsed_s=closed.elapsed_s)
                self.run_dir.log_round(record, self.state.run_id)
            self._recorded = record.round + 1

    def _on_join(self, member: Member) -> None:
        if self.run_dir is not None:
            self.run_dir.log("join", worker=member.worker_id, index=member.index, joins=member.joins,
                             hostname=member.hostname, round=self.state.round)

    def _tick(self) -> None:
        while not self._stop.wait(0.25):
            self.state.tick()
