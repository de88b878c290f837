"""Entry points that put a `Session`, a transport and the round loop together, one per transport.

- `run_grpc_worker`: join a coordinator (`lowband worker`, the Ray worker actor).
- `run_allgather_rank` / `run_allgather_local`: one rank of a torch.distributed job, or a local job of
  spawned ranks on loopback.
- `run_inproc_worker`: a worker thread on an in-process state machine (`deploy/inproc.py`).
- `run_p2p_worker`: a gossip worker: serve the Peer service, enroll with the run's rendezvous, gossip with
  graph neighbours over gRPC (`lowband worker` against a gossip run's coordinator).
"""

from __future__ import annotations

import functools
import socket
from dataclasses import asdict
from typing import Any

import torch
import yaml

from protocols.config import RunConfig, parse_config
from protocols.registry import build_protocol
from worker.client import CoordinatorClient
from worker.devices import local_ranks_device, resolve_backend, resolve_device
from worker.faults import Faults
from worker.gossip_loop import GossipLoop, GossipResult
from worker.loop import Progress, RoundLoop, WorkerResult
from worker.session import Session
from worker.spawn import spawn_on_loopback
from worker.transports.allgather import AllGatherTransport, process_group
from worker.transports.base import Transport
from worker.transports.grpc import GrpcTransport
from worker.transports.inproc import InprocTransport
from worker.transports.link import Link, worker_link
from worker.transports.p2p import P2PTransport


def with_link(transport: Transport, cfg: RunConfig, index: int) -> Transport:
    """The transport, behind worker `index`'s emulated link if the run has one (`LinkConfig.for_worker`: its
    own bandwidth, latency, jitter and loss when they vary per worker; each worker its own jitter stream)."""
    link = worker_link(cfg, index)
    if link is None:
        return transport
    model, seed = link
    return Link(transport, model, seed=seed)


def _run(session: Session, transport: Transport, progress: Progress | None, faults: Faults | None) -> WorkerResult:
    transport = with_link(transport, session.cfg, session.index)
    loop = RoundLoop(session, transport, build_protocol(session.cfg), progress, faults)
    try:
        loop.run()
    finally:
        transport.close()
    return loop.finish()


def run_grpc_worker(
    client: CoordinatorClient,
    threads: int = 1,
    progress: Progress | None = None,
    faults: Faults | None = None,
    worker_name: str = "",
) -> WorkerResult:
    """Join the coordinator, train until it says the run is finished; what this worker did."""
    torch.set_num_threads(threads)
    joined = client.join(socket.gethostname(), worker_name)
    cfg: RunConfig = parse_config(yaml.safe_load(joined.config_yaml))
    transport = GrpcTransport(client, joined)
    try:
        session = Session.build(cfg, joined.worker_index, cfg.cluster.workers)
    except BaseException:
        transport.close()
        raise
    return _run(session, transport, progress, faults)


def run_inproc_worker(
    transport: InprocTransport, session: Session, progress: Progress | None = None, faults: Faults | None = None
) -> WorkerResult:
    """One worker on an in-process coordinator state machine, already joined, its session already built
    (sessions seed torch's global RNG, so a caller running several in threads builds them one by one)."""
    return _run(session, transport, progress, faults)


def run_allgather_rank(
    rank: int,
    world_size: int,
    init_method: str,
    cfg: RunConfig,
    progress: Progress | None = None,
    num_threads: int | None = None,
    timeout_s: float = 300.0,
) -> dict[str, Any]:
    """Train one rank of `cfg.protocol` over all-gather; its `WorkerResult` as a dict, plus rank,
    world_size, backend and param_hash (the final replica's parameters). Rank 0 evaluates."""
    device = resolve_device(cfg.cluster.device, rank)
    backend = resolve_backend("auto", device)
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    protocol = build_protocol(cfg)  # fails on kinds with no aggregator half before any process group exists
    with process_group(rank, world_size, init_method, backend, timeout_s):
        if device.type == "cuda":
            torch.cuda.set_device(device)  # NCCL's communicator (and the transport's buffers) use the current device
        session = Session.build(cfg, rank, world_size, device, evaluates=rank == 0)
        transport = with_link(AllGatherTransport(cfg, protocol, rank), cfg, rank)
        loop = RoundLoop(session, transport, protocol, progress)
        loop.run()
        result = loop.finish()
        return {**asdict(result), "rank": rank, "world_size": world_size, "backend": backend}


def run_allgather_local(
    cfg: RunConfig, world_size: int, num_threads: int = 1, timeout_s: float = 300.0
) -> list[dict[str, Any]]:
    """An all-gather job of `world_size` spawned ranks on loopback; their results, by rank."""
    cfg = local_ranks_device(cfg, "auto", world_size)
    target = functools.partial(run_allgather_rank, cfg=cfg, timeout_s=timeout_s)
    return spawn_on_loopback(target, world_size, num_threads=num_threads)


def run_p2p_worker(
    rendezvous: str,
    token: str = "",
    threads: int = 1,
    worker_name: str = "",
    bind: str = "127.0.0.1:0",
    advertise: str | None = None,
    retry_for_s: float = 60.0,
    progress: Progress | None = None,
) -> GossipResult:
    """Serve the Peer service on `bind`, enroll with the gossip run's rendezvous at `rendezvous` (which assigns
    this worker's node index and sends the run's config), gossip until the run is over; what this worker did."""
    torch.set_num_threads(threads)
    transport = P2PTransport(rendezvous, token, bind, advertise, worker_name, retry_for_s=retry_for_s)
    try:
        cfg = transport.enroll()
        session = Session.build(cfg, transport.index, cfg.cluster.workers)
        loop = GossipLoop(session, transport, progress=progress)
        loop.run()
    finally:
        transport.close()
    return loop.finish()  # after close: the byte counters include the leave
