"""One coordinated run, without its transport: the state machine, the run directory, a liveness ticker,
progress and the summary.

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

from coordinator.rundir import RunDir, load_checkpoint
from coordinator.state import CoordinatorState, Phase, RoundRecord
from coordinator.tensorboard import tensorboard_listener
from coordinator.traffic import traffic_of, traffic_per_worker
from protocols.config import RunConfig
from protocols.registry import build_protocol
from protocols.round import RoundAggregator

log = logging.getLogger(__name__)


class CoordinatorRun:
    def __init__(self, cfg: RunConfig, run_dir: str | Path | None = None, resume: str | Path | None = None) -> None:
        self.cfg = cfg
        self.run_dir = RunDir(run_dir, cfg) if run_dir is not None else None
        # Called with every closed round's record (e.g. `lowband coordinator`'s plain line per round).
        self.round_listeners: list[Callable[[RoundRecord], None]] = []
        self.state = CoordinatorState(cfg, build_protocol(cfg), on_round=self._on_round)
        scalars = tensorboard_listener(self.run_dir.path, self.state) if self.run_dir is not None else None
        if scalars is not None:
            self.round_listeners.append(scalars)
        if resume is not None:
            ckpt = load_checkpoint(resume)
            if "replica" not in ckpt:
                raise ValueError(f"{resume}: not a coordinator checkpoint (no replica; a DDP run's cannot resume)")
            self.state.restore(ckpt["replica"], ckpt["aggregator_state"], ckpt["downlink_state"],
                               ckpt.get("base_digest", ""))
            log.info("resumed from %s at round %d", resume, ckpt["round"])
        self.started = time.monotonic()
        self._stop = threading.Event()
        self._ticker = threading.Thread(target=self._tick, daemon=True, name="lowband-ticker")

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
        return True

    def wait_departed(self, timeout: float) -> None:
        """After the run finished: give workers `timeout` seconds to report their final eval and leave."""
        deadline = time.monotonic() + timeout
        while self.state.live_members() and time.monotonic() < deadline:
            time.sleep(0.05)

    def progress(self) -> dict[str, Any]:
        members = {m.worker_id: asdict(m) for m in self.state.members_copy()}
        history = list(self.state.history)
        return {
            "round": self.state.round,
            "rounds": self.state.total_rounds,
            "phase": self.state.phase.value,
            "workers": members,
            "last": asdict(history[-1]) if history else None,
        }

    def summary(self) -> dict[str, Any]:
        members = self.state.members_copy()
        finals = [m.eval_loss for m in members if m.eval_loss is not None]
        n = max(len(members), 1)
        return {
            "name": self.cfg.name,
            "run_id": self.state.run_id,
            "protocol": self.cfg.protocol.kind,
            "rounds": self.state.round,
            "final_eval_loss": sum(finals) / len(finals) if finals else None,
            "tokens": sum(m.tokens for m in members),
            "wall_s": time.monotonic() - self.started,
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
                              "resyncs": m.resyncs, "alive": m.alive, "traffic": traffic_of(m)}
                for m in members
            },
        }

    def _on_round(self, record: RoundRecord, aggregator: RoundAggregator) -> None:
        for listener in self.round_listeners:
            listener(record)
        if self.run_dir is None:
            return
        self.run_dir.log_round(record)
        self.run_dir.save_checkpoint(aggregator.replica, aggregator.state, aggregator.downlink_state, self.state.run_id,
                                     self.state.base_digest)

    def _tick(self) -> None:
        while not self._stop.wait(0.25):
            self.state.tick()
