"""A whole simulation put together from a run config: the task and its client partition, the pool, the
DP plan, the aggregator, and the rows every round logs.

The noise multiplier is planned once, before anything trains, for the worst-placed client: the one with
the highest sampling rate (batch / its samples) and the most steps per round, taking part in every round.
epsilon grows with both, so that one noise multiplier keeps every client within the budget whatever the
sampling; a budget that no noise multiplier up to `dp.max_noise_multiplier` meets stops the run here.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from protocols.base import MeanAccumulator
from protocols.config import ConfigError, RunConfig
from protocols.downlink import Downlink
from protocols.registry import build_protocol
from protocols.replica import Replica
from protocols.round import RoundAggregator
from protocols.simulation_config import SimulationConfig
from worker.federated.engine import Engine, RoundLog
from worker.federated.pool import PoolTrainer, build_pool_worker
from worker.federated.tasks import FederatedTask, build_task
from worker.trainer import load_trainable, trainable

if TYPE_CHECKING:  # opacus is imported only when a run asks for DP
    from worker.federated.dp import DPBudget


def simulation_of(cfg: RunConfig) -> SimulationConfig:
    if cfg.simulation is None:
        raise ConfigError("this recipe has no simulation: block; `lowband simulate` needs one (see fedavg-digits.yaml)")
    return cfg.simulation


def plan_dp(sim: SimulationConfig, task: FederatedTask, steps: np.ndarray) -> DPBudget | None:
    """The run's DP plan, its noise multiplier and what the worst-placed client would spend (see the module
    docstring), or None without DP; `steps[c]` is client c's local steps per round."""
    if not sim.dp.enabled:
        return None
    from worker.federated.dp import DPBudget, sample_rate

    smallest = min(task.samples(c) for c in range(sim.clients))  # the largest sampling rate
    return DPBudget.make(sim.dp, sample_rate(sim.batch_size, smallest), int(steps.max()), sim.rounds)


PoolMaker = Callable[[RunConfig, int, str], PoolTrainer]  # (config, index, spill root) -> a pool worker


class Simulation:
    def __init__(self, cfg: RunConfig, spill_dir: str | Path | None = None, pool: PoolMaker | None = None) -> None:
        """`pool`: how to make the pool's workers (deploy/simulate_ray.py: Ray actors); None: in this process,
        as threads sharing one task."""
        self.cfg, self.sim = cfg, simulation_of(cfg)
        sim = self.sim
        protocol = build_protocol(cfg)
        if not isinstance(protocol.new_round(), MeanAccumulator):
            raise ConfigError(f"lowband simulate folds each pool worker's clients into one weighted mean; protocol "
                              f"{cfg.protocol.kind!r} aggregates otherwise (use fedavg, fedavg-lora, ffa-lora, fedsvd "
                              "or diloco without robust aggregation)")
        self.task = build_task(cfg)
        if sim.clients > self.task.num_clients():
            raise ConfigError(f"simulation.clients {sim.clients} exceeds the {self.task.num_clients()} clients "
                              f"partition {sim.partition!r} of task {sim.task!r} can make")
        steps = np.asarray([self.task.steps(c, sim.local_epochs, sim.batch_size, sim.max_local_steps)
                            for c in range(sim.clients)])
        self.dp = plan_dp(sim, self.task, steps)
        self.noise = self.dp.noise_multiplier if self.dp is not None else None
        self._tmp = tempfile.TemporaryDirectory(prefix="lowband-clients-") if spill_dir is None else None
        spill = str(sim.store.spill_dir or spill_dir or self._tmp.name)  # type: ignore[union-attr]
        if pool is None:
            local = [build_pool_worker(cfg, w, spill, self.task) for w in range(sim.workers)]
            self.local_workers = local
            self.workers: list[PoolTrainer] = list(local)
        else:
            self.local_workers = []
            self.workers = [pool(cfg, w, spill) for w in range(sim.workers)]
        torch.manual_seed(cfg.seed)  # the model every pool worker built: the replica and the eval model
        self.eval_model = self.task.build_model()
        replica = Replica(0, {n: p.detach().clone() for n, p in trainable(self.eval_model).items()})
        self.aggregator = RoundAggregator(protocol, Downlink.of(cfg.protocol, protocol), replica)
        self.engine = Engine(sim, cfg.seed, steps, self.workers, self.aggregator, self.noise, self._evaluate)
        self.started = time.monotonic()

    def _evaluate(self, replica: Replica) -> dict[str, float]:
        load_trainable(self.eval_model, replica.params)
        return self.task.evaluate(self.eval_model)

    def rounds(self) -> Iterator[RoundLog]:
        """Every round's log, as it closes."""
        try:
            yield from (self.engine.fedbuff() if self.sim.asynchronous.enabled else self.engine.synchronous())
        finally:
            self.engine.close()

    def summary(self, logs: list[RoundLog]) -> dict[str, Any]:
        last_metrics = next((log.metrics for log in reversed(logs) if log.metrics), {})
        stores = [w.store for w in self.local_workers]
        sent, received, pool = sum(self.engine.bytes_sent), sum(self.engine.bytes_received), len(self.workers)
        return {
            "name": self.cfg.name,
            "protocol": self.cfg.protocol.kind,
            "task": self.sim.task,
            "clients": self.sim.clients,
            "rounds": len(logs),
            "mode": "fedbuff" if self.sim.asynchronous.enabled else "synchronous",
            **{f"final_{k}": v for k, v in last_metrics.items()},
            "sim_time_s": logs[-1].sim_time_s if logs else 0.0,
            "wall_s": time.monotonic() - self.started,
            "client_updates": sum(log.aggregated for log in logs),
            "messages": sum(log.messages for log in logs),
            # Per pool worker, between it and the aggregator (RoundLog says what counts), averaged over the pool.
            "bytes_sent_per_worker": sent / pool,
            "bytes_received_per_worker": received / pool,
            "bytes_total_per_worker": (sent + received) / pool,
            "refusals": self.engine.refusals[:100],
            "noise_multiplier": self.noise,
            "dp_plan": self.dp.summary() if self.dp is not None else None,
            "dp_epsilon_max": max(self.engine.epsilons.values()) if self.engine.epsilons else None,
            "dp_epsilon_per_client": {str(c): e for c, e in sorted(self.engine.epsilons.items())},
            "backend": self.sim.backend,
            # The store's counts, for the in-process pool (a Ray actor keeps its own store).
            "clients_with_state": sum(len(s) for s in stores) if stores else None,
            "clients_spilled": sum(s.spilled for s in stores) if stores else None,
        }

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()


def log_row(log: RoundLog) -> dict[str, Any]:
    row = asdict(log)
    row.update(row.pop("metrics"))
    return row
