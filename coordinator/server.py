"""The coordinator process: state machine + gRPC server + run directory, with a liveness ticker.

`CoordinatorServer` is what both `lowband coordinator` (plain process) and the Ray coordinator actor
run; nothing here knows about Ray.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent import futures
from dataclasses import asdict
from pathlib import Path
from typing import Any

import grpc

from compression.registry import decode
from coordinator.rundir import RunDir, load_checkpoint
from coordinator.servicer import CoordinatorServicer
from coordinator.state import CoordinatorState, Phase, RoundRecord
from protocols.base import Params
from protocols.config import RunConfig
from protocols.registry import build_protocol
from protocols.wire import lowband_pb2_grpc, serde
from protocols.wire.messages import GRPC_OPTIONS

log = logging.getLogger(__name__)


class CoordinatorServer:
    def __init__(
        self,
        cfg: RunConfig,
        bind: str = "127.0.0.1:0",
        run_dir: str | Path | None = None,
        resume: str | Path | None = None,
        tls: tuple[bytes, bytes] | None = None,
    ) -> None:
        self.cfg = cfg
        self.run_dir = RunDir(run_dir, cfg) if run_dir is not None else None
        self.state = CoordinatorState(
            cfg, build_protocol(cfg), decode=decode, hasher=serde.state_hash, on_round=self._on_round
        )
        if resume is not None:
            ckpt = load_checkpoint(resume)
            self.state.restore(int(ckpt["round"]), ckpt["params"], ckpt["server_state"])
            log.info("resumed from %s at round %d", resume, ckpt["round"])
        threads = 4 * cfg.cluster.workers + 8  # every worker may hold one long-poll plus a stream
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=threads), options=GRPC_OPTIONS)
        lowband_pb2_grpc.add_CoordinatorServicer_to_server(CoordinatorServicer(self.state), self.server)
        if tls is not None:
            creds = grpc.ssl_server_credentials([(tls[1], tls[0])])  # (private key, certificate chain)
            self.port = self.server.add_secure_port(bind, creds)
        else:
            self.port = self.server.add_insecure_port(bind)
        if self.port == 0:
            raise OSError(f"could not bind the coordinator to {bind!r}")
        self.host = bind.rsplit(":", 1)[0]
        self.started = time.monotonic()
        self._stop = threading.Event()
        self._ticker = threading.Thread(target=self._tick, daemon=True, name="lowband-ticker")

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> CoordinatorServer:
        self.server.start()
        self._ticker.start()
        if self.run_dir is not None:
            self.run_dir.log("start", run_id=self.state.run_id, address=self.address, rounds=self.state.total_rounds)
        log.info("coordinator for run %s listening on %s", self.state.run_id, self.address)
        return self

    def stop(self, grace: float = 1.0) -> None:
        self._stop.set()
        self.server.stop(grace).wait()

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
            "bytes_up_per_worker": sum(m.bytes_up for m in members) / n,
            "bytes_down_per_worker": sum(m.bytes_down for m in members) / n,
            "state_hash": self.state.state_hash,
            "workers": {
                m.worker_id: {"bytes_up": m.bytes_up, "bytes_down": m.bytes_down, "tokens": m.tokens, "alive": m.alive}
                for m in members
            },
        }

    def _on_round(self, record: RoundRecord, params: Params, server_state: Any) -> None:
        if self.run_dir is None:
            return
        self.run_dir.log_round(record)
        self.run_dir.save_checkpoint(record.round + 1, params, server_state, self.state.run_id)

    def _tick(self) -> None:
        while not self._stop.wait(0.25):
            self.state.tick()
