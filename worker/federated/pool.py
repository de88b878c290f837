"""A pool worker of a simulation: it trains many clients in turn and folds their updates into one partial
aggregate, so a round costs one message per pool worker, not per client.

Clients stick to a pool worker (`client % workers`), so their state (the protocol's per-client worker
state, the DP accountant) lives in that worker's `ClientStore` and never moves between processes. The
partial is the clients' sample-weighted mean update with the sum of their weights as its weight: folded by
the aggregator's weighted mean, it gives exactly the mean over all clients. That holds for protocols whose
accumulator is a weighted mean (`MeanAccumulator`); the simulator refuses the others.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from typing import Protocol as Structural

import torch

from compression.payload import dense
from protocols.base import MeanAccumulator, Protocol, Update
from protocols.check import UpdateRejected, check_update, expectation
from protocols.config import RunConfig
from protocols.registry import build_protocol
from protocols.replica import Replica
from worker.federated.local import train_client
from worker.federated.store import ClientStore
from worker.federated.tasks import FederatedTask, build_task


@dataclass
class ClientJob:
    client: int
    seed: int  # the client's round seed: its batches and its DP noise
    weight_scale: float = 1.0  # a late update's staleness weight
    noise_multiplier: float | None = None


@dataclass
class ClientOutcome:
    client: int
    samples: int
    loss: float
    update: Update  # the client's own (for FedBuff, which folds arrivals one by one)
    epsilon: float | None = None
    refused: str = ""  # why the client's update was refused (wrong shapes, tensors, ...): not folded


@dataclass
class Partial:
    """A pool worker's share of a round: its clients' weighted mean update, or None when it had none."""

    update: Update | None
    outcomes: list[ClientOutcome] = field(default_factory=list)


class PoolWorker:
    def __init__(self, task: FederatedTask, protocol: Protocol[Any, Any], store: ClientStore, lr: float,
                 local_epochs: int, batch_size: int, max_steps: int | None, frozen: tuple[str, ...],
                 max_grad_norm: float = 1.0, delta: float = 1e-5) -> None:
        self.task, self.protocol, self.store = task, protocol, store
        self.model = task.build_model()
        self.lr, self.epochs, self.batch_size, self.max_steps = lr, local_epochs, batch_size, max_steps
        self.frozen, self.max_grad_norm, self.delta = frozen, max_grad_norm, delta

    def train(self, replica: Replica, jobs: list[ClientJob], fold: bool = True) -> Partial:
        """Train every job's client from `replica`; their updates folded into one partial (or, `fold` False,
        returned one by one in the outcomes)."""
        acc = MeanAccumulator()
        expect = expectation(self.protocol, replica, "dense")
        outcomes = []
        for job in jobs:
            outcome = self._train_one(replica, job)
            outcomes.append(outcome)
            try:  # every client's update is checked as the aggregator checks one: applied whole or not at all
                checked = check_update(f"client{job.client}", outcome.update, expect)
            except UpdateRejected as err:
                outcome.refused = str(err)
                continue
            if fold:
                acc.fold(f"client{job.client}", checked)
        if not fold or not acc.count:
            return Partial(None, outcomes)
        mean = acc.mean()
        return Partial(Update({n: dense(t) for n, t in mean.items()}, weight=acc.total_weight), outcomes)

    def _train_one(self, replica: Replica, job: ClientJob) -> ClientOutcome:
        generator = torch.Generator().manual_seed(job.seed)
        batches = self.task.batches(job.client, self.epochs, self.batch_size, self.max_steps, generator)
        local, loss = train_client(self.model, replica.params, batches, self.lr, self.frozen, job.noise_multiplier,
                                   self.max_grad_norm, generator)
        saved = self.store.get(job.client) or {}
        state = saved.get("protocol")
        if state is None:
            state = self.protocol.init_worker_state(replica.params)
        update, state = self.protocol.make_update(local, replica.params, state)
        samples = self.task.samples(job.client)
        update = dataclasses.replace(update, weight=samples * job.weight_scale)
        record: dict[str, Any] = {"protocol": state}
        epsilon = None
        if job.noise_multiplier is not None:
            from worker.federated.dp import ClientAccountant, sample_rate

            accountant = saved.get("dp") or ClientAccountant()
            accountant.spend(job.noise_multiplier, sample_rate(self.batch_size, samples), len(batches))
            epsilon = accountant.epsilon(self.delta)
            record["dp"] = accountant
        self.store.put(job.client, record)
        return ClientOutcome(job.client, samples, loss, update, epsilon)


class PoolTrainer(Structural):
    """What the engine calls: a `PoolWorker` in this process, or a proxy to one in a Ray actor."""

    def train(self, replica: Replica, jobs: list[ClientJob], fold: bool = True) -> Partial: ...


def build_pool_worker(cfg: RunConfig, index: int, spill_root: str | Path, task: FederatedTask | None = None
                      ) -> PoolWorker:
    """Pool worker `index` of `cfg`'s simulation, built alike in this process or in a Ray actor: the same seeded
    model (and frozen base), its share of the store's memory budget, its own spill directory."""
    sim = cfg.simulation
    if sim is None:
        raise ValueError("build_pool_worker needs a config with a simulation: block")
    task = task if task is not None else build_task(cfg)
    torch.manual_seed(cfg.seed)
    store = ClientStore(sim.store.memory_budget_mb * 2**20 // sim.workers, Path(spill_root) / f"pool{index}")
    frozen = tuple(getattr(cfg.protocol, "frozen_in_training", ()))
    return PoolWorker(task, build_protocol(cfg), store, sim.lr, sim.local_epochs, sim.batch_size,
                      sim.max_local_steps, frozen, sim.dp.max_grad_norm, sim.dp.delta)
