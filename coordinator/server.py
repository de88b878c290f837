"""The coordinator process: a gRPC server in front of a `CoordinatorRun` (state machine, run directory,
liveness ticker).

`CoordinatorServer` is what both `lowband coordinator` (plain process) and the Ray coordinator actor
run; nothing here knows about Ray.
"""

from __future__ import annotations

import logging
from pathlib import Path

import grpc.aio

from coordinator.collector import freeze_startup
from coordinator.malloc import allocator_settings, tune_malloc
from coordinator.run import CoordinatorRun
from coordinator.servicer import CallLimits, CoordinatorServicer
from coordinator.sessions import check_open_bind
from coordinator.traffic import ControlTraffic
from protocols.config import RunConfig
from protocols.wire import lowband_pb2_grpc
from protocols.wire.aio_servicing import AsyncRequestGuard, LoopThread
from protocols.wire.servicing import server_credentials, server_options

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
        self.servicer = CoordinatorServicer(self.state)
        freeze_startup()  # out of every later garbage collection (coordinator/collector.py)
        limits = CallLimits.of(cfg)  # room for every bounded long call plus the quick ones (coordinator/servicer.py)
        # A client that opens a call and never sends its request is ended after the wait, at most `limits.readers`
        # such calls at once.
        self.request_guard = AsyncRequestGuard("coordinator", limits.readers,
                                               min(cfg.cluster.stream_idle_s, REQUEST_WAIT_S))
        # Every call is a coroutine on this loop: open calls hold no thread (protocols/wire/aio_servicing.py).
        self.loop_thread = LoopThread("lowband-grpc")
        try:
            self.port = self.loop_thread.run(self._serve_on(cfg, bind, tls, limits))
        except BaseException:
            self.loop_thread.close()
            raise
        self.host = bind.rsplit(":", 1)[0]

    async def _serve_on(self, cfg: RunConfig, bind: str,
                        tls: tuple[bytes, bytes] | tuple[bytes, bytes, bytes] | None, limits: CallLimits) -> int:
        """(On the loop: grpc.aio objects belong to the loop they were made on.) The server, bound; its port."""
        # An open call proves its worker alive (CoordinatorState.attend); a silent link is found by keepalive
        # pings within 3/4 of the heartbeat timeout, and the worker dropped a heartbeat timeout after that.
        keepalive_s = (cfg.cluster.heartbeat_timeout_s / 4, cfg.cluster.heartbeat_timeout_s / 2)
        self.server = grpc.aio.server(options=server_options(limits.max_concurrent_rpcs, keepalive_s=keepalive_s),
                                      maximum_concurrent_rpcs=limits.max_concurrent_rpcs,
                                      interceptors=[ControlTraffic(self.state)])
        self.request_guard.add(lowband_pb2_grpc.add_CoordinatorServicer_to_server, self.servicer, self.server)
        if tls is not None:
            creds = server_credentials(*tls)  # (certificate chain, private key[, CA of required client certs])
            port = self.server.add_secure_port(bind, creds)
        else:
            port = self.server.add_insecure_port(bind)
        if port == 0:
            raise OSError(f"could not bind the coordinator to {bind!r}")
        return port

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> CoordinatorServer:
        self.loop_thread.run(self.server.start())
        self.start_ticker()
        if self.run_dir is not None:
            self.run_dir.log("start", run_id=self.state.run_id, address=self.address, rounds=self.state.total_rounds,
                             allocator=allocator_settings())
        log.info("coordinator for run %s listening on %s", self.state.run_id, self.address)
        return self

    def stop(self, grace: float = 1.0) -> None:
        if not self.loop_thread.thread.is_alive():
            return  # stopped already
        self.stop_ticker()
        self.loop_thread.run(self.server.stop(grace))
        self.servicer.close()
        self.loop_thread.close()
