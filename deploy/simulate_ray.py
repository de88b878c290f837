"""The simulator's pool as Ray actors (`simulation.backend: ray`), each with `cluster.cpus_per_worker` CPUs.

Each actor builds its pool worker from the run config exactly as the in-process pool does
(`worker.federated.pool.build_pool_worker`) and keeps its clients' state in its own store; the driver sends
it the replica and the round's jobs and gets one partial back, so a round still costs O(workers) messages.
"""

from __future__ import annotations

from typing import Any

import ray

from deploy.launcher import start_ray
from protocols.config import RunConfig
from protocols.replica import Replica
from worker.federated.pool import ClientJob, Partial, build_pool_worker


@ray.remote
class PoolActor:
    def __init__(self, cfg_json: dict[str, Any], index: int, spill_root: str) -> None:
        import torch

        torch.set_num_threads(1)
        self.worker = build_pool_worker(RunConfig.model_validate(cfg_json), index, spill_root)

    def train(self, replica: Replica, jobs: list[ClientJob], fold: bool) -> Partial:
        return self.worker.train(replica, jobs, fold)


class RemotePoolWorker:
    """The engine's view of one actor: `train` blocks on the actor's answer (the engine calls the pool's
    workers from threads, so the actors still train in parallel)."""

    def __init__(self, actor: Any) -> None:
        self.actor = actor

    def train(self, replica: Replica, jobs: list[ClientJob], fold: bool = True) -> Partial:
        partial: Partial = ray.get(self.actor.train.remote(replica, jobs, fold))
        return partial


def ray_pool(address: str | None = None) -> Any:
    """A `Simulation` pool maker that starts Ray (or joins `address`) and places one actor per pool worker."""

    def make(cfg: RunConfig, index: int, spill_root: str) -> RemotePoolWorker:
        start_ray(cfg, address)
        actor = PoolActor.options(num_cpus=cfg.cluster.cpus_per_worker).remote(  # type: ignore[attr-defined]
            cfg.model_dump(mode="json"), index, spill_root)
        return RemotePoolWorker(actor)

    return make
