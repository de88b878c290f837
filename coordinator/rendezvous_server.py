"""The coordinator process of a gossip run: a gRPC server in front of a `Rendezvous`, and nothing else.

`lowband coordinator` runs it instead of `CoordinatorServer` when the config's protocol is gossip: there is no
aggregator, so no state machine, replica or checkpoint; the rendezvous says who is in the run and where each
worker's Peer service listens, writes metrics.jsonl from the workers' round reports, and drops workers whose
heartbeats stop (a ticker calls `Rendezvous.tick`). It binds without SO_REUSEPORT (a port in use fails with
one OSError), and bounds its threads and concurrent calls (`RendezvousLimits`); a call whose request does not arrive
is ended (`UnaryRequestGuard`). The models travel worker to worker
(worker/transports/p2p.py); the servicer's per-worker byte counters show that none passed through here.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc

from coordinator.rendezvous import Rendezvous
from coordinator.rendezvous_servicer import RendezvousLimits, RendezvousServicer
from coordinator.sessions import check_open_bind
from protocols.config import RunConfig
from protocols.wire import lowband_pb2_grpc
from protocols.wire.servicing import UnaryRequestGuard, listen, server_options

log = logging.getLogger(__name__)
TICK_S = 0.25
# A call's request must arrive within this (or cluster.stream_idle_s, if shorter).
REQUEST_WAIT_S = 10.0


class RendezvousServer:
    def __init__(self, cfg: RunConfig, bind: str = "127.0.0.1:0", run_dir: str | Path | None = None) -> None:
        check_open_bind(bind, bool(cfg.cluster.token), "gossip rendezvous")
        self.cfg = cfg
        self.rendezvous = Rendezvous(cfg, run_dir=run_dir)
        self.servicer = RendezvousServicer(self.rendezvous)
        limits = RendezvousLimits.of(cfg)  # room for every waiting Roster plus the quick calls
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=limits.threads),
                                  options=server_options(limits.max_concurrent_rpcs),
                                  maximum_concurrent_rpcs=limits.max_concurrent_rpcs)
        # A client that opens a call and never sends its request is ended after the wait, holding one of at
        # most `limits.readers` threads meanwhile.
        self.request_guard = UnaryRequestGuard("rendezvous", limits.readers,
                                               min(cfg.cluster.stream_idle_s, REQUEST_WAIT_S))
        self.request_guard.add(lowband_pb2_grpc.add_RendezvousServicer_to_server, self.servicer, self.server)
        self.port = listen(self.server, bind, "gossip rendezvous")  # a port in use fails (no SO_REUSEPORT)
        self.host = bind.rsplit(":", 1)[0]
        self._stop = threading.Event()
        self._ticker = threading.Thread(target=self._tick, daemon=True, name="lowband-rendezvous-ticker")

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def run_dir(self) -> Any:
        return self.rendezvous.run_dir

    def _tick(self) -> None:
        while not self._stop.wait(TICK_S):
            self.rendezvous.tick()

    def start(self) -> RendezvousServer:
        self.server.start()
        self._ticker.start()
        if self.rendezvous.run_dir is not None:
            self.rendezvous.run_dir.log("start", run_id=self.rendezvous.run_id, address=self.address,
                                        rounds=self.rendezvous.total_rounds, transport="p2p")
        log.info("rendezvous for gossip run %s listening on %s", self.rendezvous.run_id, self.address)
        return self

    def wait_finished(self, timeout: float | None = None) -> bool:
        return self.rendezvous.wait_finished(timeout)

    def wait_departed(self, timeout: float) -> None:
        """After the run finished: give workers `timeout` seconds to leave (their final reports came first)."""
        deadline = time.monotonic() + timeout
        while any(p.alive for p in self.rendezvous.members_copy()) and time.monotonic() < deadline:
            time.sleep(0.05)

    def summary(self) -> dict[str, Any]:
        """The rendezvous' summary, plus the bytes each worker exchanged with the rendezvous itself."""
        rendezvous_bytes = self.servicer.bytes_by_worker()
        n = max(len(rendezvous_bytes), 1)
        return {**self.rendezvous.summary(), "transport": "p2p", "rendezvous_bytes": rendezvous_bytes,
                "rendezvous_bytes_total_per_worker": sum(b["bytes_total"] for b in rendezvous_bytes.values()) / n}

    def stop(self, grace: float = 1.0) -> None:
        self._stop.set()
        self.server.stop(grace).wait()
