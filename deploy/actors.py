"""The Ray actors: thin shells that run the coordinator and worker processes inside Ray.

All logic lives in `coordinator/` and `worker/`; these only give Ray something to schedule with
explicit `num_cpus` (and `num_gpus` when the run trains on CUDA: deploy/gpus.py), and return plain dicts
to the driver.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import Any

import ray

from coordinator.server import CoordinatorServer
from protocols.config import RunConfig
from worker.client import CoordinatorClient
from worker.faults import Faults
from worker.runners import run_grpc_worker


def node_bind() -> str:
    """HOST:0 on the address Ray knows this node by (a free port; IPv6 hosts bracketed)."""
    host = ray.util.get_node_ip_address()
    return f"[{host}]:0" if ":" in host else f"{host}:0"


@ray.remote
class CoordinatorActor:
    def __init__(self, cfg_json: dict[str, Any], run_dir: str) -> None:
        logging.basicConfig(level=logging.WARNING)
        # The node's own address, not loopback: on a multi-node cluster (`lowband run --address`) the worker
        # actors dial it from other machines.
        self.server = CoordinatorServer(RunConfig.model_validate(cfg_json), bind=node_bind(), run_dir=run_dir)

    def start(self) -> str:
        return self.server.start().address

    def progress(self) -> dict[str, Any]:
        return self.server.progress()

    def rounds_since(self, closed: int) -> list[dict[str, Any]]:
        """The records of the rounds closed after the first `closed` (for the driver's plain line per round)."""
        return [asdict(record) for record in list(self.server.state.history)[closed:]]

    def finish(self, grace_s: float) -> dict[str, Any]:
        """Wait for the last round, let workers report their final eval, stop, and summarize."""
        self.server.wait_finished()
        self.server.wait_departed(grace_s)
        summary = self.server.summary()
        self.server.stop()
        return summary


@ray.remote
class WorkerActor:
    def ready(self) -> bool:
        return True

    def run(self, address: str, token: str, threads: int, faults: dict[str, Any]) -> dict[str, Any]:
        logging.basicConfig(level=logging.WARNING)
        client = CoordinatorClient(address, token=token)
        try:
            return asdict(run_grpc_worker(client, threads=threads, faults=Faults(**faults)))
        finally:
            client.close()


@ray.remote
class DDPActor:
    def ready(self) -> bool:
        return True

    def run(self, rank: int, world: int, init_method: str, cfg_json: dict[str, Any], threads: int,
            checkpoint: str) -> dict[str, Any]:
        import torch

        from worker.ddp import run_ddp_worker

        torch.set_num_threads(threads)
        return run_ddp_worker(rank, world, init_method, RunConfig.model_validate(cfg_json), checkpoint=checkpoint)


@ray.remote
class AllGatherActor:
    def ready(self) -> bool:
        return True

    def run(self, rank: int, world: int, init_method: str, cfg_json: dict[str, Any], threads: int) -> dict[str, Any]:
        from worker.runners import run_allgather_rank

        return run_allgather_rank(rank, world, init_method, RunConfig.model_validate(cfg_json), num_threads=threads)


@ray.remote
class InprocActor:
    def ready(self) -> bool:
        return True

    def run(self, cfg_json: dict[str, Any], run_dir: str, threads: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        import torch

        from deploy.gossip_inproc import run_inproc_gossip
        from deploy.inproc import run_inproc

        torch.set_num_threads(threads)
        cfg = RunConfig.model_validate(cfg_json)
        if cfg.protocol.kind == "gossip":  # no coordinator: node threads and a rendezvous object
            gossip_summary, nodes = run_inproc_gossip(cfg, run_dir)
            return gossip_summary, [asdict(r) for r in nodes]
        summary, results = run_inproc(cfg, run_dir)
        return summary, [asdict(r) for r in results]
