"""The coordinator process: a gRPC server in front of a `CoordinatorRun` (state machine, run directory,
liveness ticker).

`CoordinatorServer` is what both `lowband coordinator` (plain process) and the Ray coordinator actor
run; nothing here knows about Ray.
"""

from __future__ import annotations

import logging
from concurrent import futures
from pathlib import Path

import grpc

from coordinator.malloc import allocator_settings, tune_malloc
from coordinator.run import CoordinatorRun
from coordinator.servicer import CallLimits, CoordinatorServicer
from coordinator.sessions import check_open_bind
from coordinator.traffic import ControlTraffic
from protocols.config import RunConfig
from protocols.wire import lowband_pb2_grpc
from protocols.wire.servicing import UnaryRequestGuard, server_credentials, server_options

log = logging.getLogger(__name__)
# A call's request must arrive within this (or cluster.stream_idle_s, if shorter).
REQUEST_WAIT_S = 10.0


class CoordinatorServer(CoordinatorRun):
    def __init__(
        self,
        cfg: RunConfig,
        bind: str = "127.0.0.1:0",
        run_dir: str | Path | None = None,
        resume: str | Path | None = None,
        tls: tuple[bytes, bytes] | tuple[bytes, bytes, bytes] | None = None,
        worker_tokens: dict[str, str] | None = None,
    ) -> None:
        check_open_bind(bind, bool(cfg.cluster.token or worker_tokens), "coordinator")
        tune_malloc()  # before the server's threads exist: each would otherwise get an arena (coordinator/malloc.py)
        super().__init__(cfg, run_dir, resume, worker_tokens)
        limits = CallLimits.of(cfg)  # room for every bounded long call plus the quick ones (coordinator/servicer.py)
        # An open call proves its worker alive (CoordinatorState.attend); a silent link is found by keepalive
        # pings within 3/4 of the heartbeat timeout, and the worker dropped a heartbeat timeout after that.
        keepalive_s = (cfg.cluster.heartbeat_timeout_s / 4, cfg.cluster.heartbeat_timeout_s / 2)
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=limits.threads),
                                  options=server_options(limits.max_concurrent_rpcs, keepalive_s=keepalive_s),
                                  maximum_concurrent_rpcs=limits.max_concurrent_rpcs,
                                  interceptors=[ControlTraffic(self.state)])
        self.servicer = CoordinatorServicer(self.state)
        # A client that opens a call and never sends its request is ended after the wait, holding one of at most
        # `limits.readers` threads meanwhile (without this, such calls would hold every pool thread).
        self.request_guard = UnaryRequestGuard("coordinator", limits.readers,
                                               min(cfg.cluster.stream_idle_s, REQUEST_WAIT_S))
        self.request_guard.add(lowband_pb2_grpc.add_CoordinatorServicer_to_server, self.servicer, self.server)
        if tls is not None:
            creds = server_credentials(*tls)  # (certificate chain, private key[, CA of required client certs])
            self.port = self.server.add_secure_port(bind, creds)
        else:
            self.port = self.server.add_insecure_port(bind)
        if self.port == 0:
            raise OSError(f"could not bind the coordinator to {bind!r}")
        self.host = bind.rsplit(":", 1)[0]

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> CoordinatorServer:
        self.server.start()
        self.start_ticker()
        if self.run_dir is not None:
            self.run_dir.log("start", run_id=self.state.run_id, address=self.address, rounds=self.state.total_rounds,
                             allocator=allocator_settings())
        log.info("coordinator for run %s listening on %s", self.state.run_id, self.address)
        return self

    def stop(self, grace: float = 1.0) -> None:
        self.stop_ticker()
        self.server.stop(grace).wait()
        self.servicer.close()
