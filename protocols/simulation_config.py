"""The `simulation:` block: federated clients as state, simulated by `lowband simulate` (deploy/simulate.py).

N clients (100 to 10,000) each hold a private shard of a task's data; every round a seeded fraction of them
is sampled, each trains locally from the global model, and a small pool of workers folds its clients'
updates into one partial aggregate before anything crosses to the aggregator (worker/federated/engine.py).
Clients are slow or gone in simulated time (`ClientTimingConfig`): nothing sleeps.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, PositiveFloat, PositiveInt, model_validator

from protocols.dp_config import DPConfig
from protocols.settings import _Strict


class ClientTimingConfig(_Strict):
    """How long a client's round takes in simulated seconds, and whether it shows up at all.

    A client's speed is drawn once from the run seed: `samples_per_s * exp(sigma * z)`, z standard normal
    (lognormal: a few clients are far slower than the median), or client i's entry of `trace` (a text file
    of one speed per line, samples per second, cycled). Its round takes `local samples processed / speed`
    seconds. Each sampled client drops out (never answers) with probability `dropout`, drawn per round.
    """

    samples_per_s: PositiveFloat = 200.0  # the median client's speed
    sigma: float = Field(0.5, ge=0.0)  # spread of log-speed across clients
    trace: str | None = None  # a file of per-client speeds in place of the lognormal draw
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    # Synchronous rounds close at this many simulated seconds; None waits for every sampled client.
    deadline_s: PositiveFloat | None = None
    # Or the deadline as a quantile of the clients' round times: 0.8 makes the slowest 20% stragglers.
    deadline_quantile: float | None = Field(None, gt=0.0, lt=1.0)
    # A late update (past the deadline): dropped, or folded into the next round with a staleness weight.
    late: Literal["drop", "stale_weight"] = "drop"
    # FedBuff's and a late update's weight: (1 + staleness) ** -staleness_exponent (Nguyen et al.).
    staleness_exponent: float = Field(0.5, ge=0.0)

    @model_validator(mode="after")
    def _one_deadline(self) -> ClientTimingConfig:
        if self.deadline_s is not None and self.deadline_quantile is not None:
            raise ValueError("simulation.timing: give deadline_s or deadline_quantile, not both")
        return self


class AsyncConfig(_Strict):
    """FedBuff (Nguyen et al., AISTATS 2022, arXiv:2106.06639): `concurrency` clients train at once, each from
    the model version current when it started; the server aggregates every `buffer_k` arrivals, each update
    weighted by its staleness (versions since it started)."""

    enabled: bool = False
    buffer_k: PositiveInt = 10
    concurrency: PositiveInt = 20


class StoreConfig(_Strict):
    """Where per-client state (error feedback, DP accountant, optimizer) lives: in memory up to
    `memory_budget_mb`, the least recently used clients spilled to `spill_dir` past it."""

    memory_budget_mb: PositiveInt = 1024
    spill_dir: str | None = None  # None: a temporary directory of the run


class SimulationConfig(_Strict):
    task: Literal["digits", "shakespeare"] = "digits"
    clients: int = Field(100, ge=2, le=100_000)
    fraction: float = Field(0.1, gt=0.0, le=1.0)  # of the clients sampled each round
    rounds: PositiveInt = 50
    partition: Literal["iid", "dirichlet", "by_play", "by_role", "pathological"] = "dirichlet"
    alpha: PositiveFloat = 0.5  # dirichlet concentration
    classes_per_client: PositiveInt = 2  # pathological
    local_epochs: PositiveInt = 1
    batch_size: PositiveInt = 16
    lr: PositiveFloat = 0.05  # local SGD
    max_local_steps: PositiveInt | None = None  # cap on a client's steps per round (big Shakespeare roles)
    workers: PositiveInt = 2  # the pool that trains the sampled clients in turn
    # inproc: the pool's workers are threads of this process; ray: Ray actors of cluster.cpus_per_worker CPUs.
    backend: Literal["inproc", "ray"] = "inproc"
    eval_every: PositiveInt = 1  # rounds between server-side evaluations
    timing: ClientTimingConfig = ClientTimingConfig()
    asynchronous: AsyncConfig = AsyncConfig()
    store: StoreConfig = StoreConfig()
    dp: DPConfig = DPConfig()

    @model_validator(mode="after")
    def _fits_the_task(self) -> SimulationConfig:
        if self.task == "digits" and self.partition in ("by_play", "by_role"):
            raise ValueError(f"simulation.partition {self.partition!r} is for the shakespeare task; digits takes "
                             "iid, dirichlet or pathological")
        if self.task == "shakespeare" and self.partition == "pathological":
            raise ValueError("simulation.partition 'pathological' splits digits' classes; shakespeare takes iid, "
                             "dirichlet, by_play or by_role")
        if self.asynchronous.enabled and (self.timing.deadline_s or self.timing.deadline_quantile) is not None:
            raise ValueError("simulation.timing.deadline_s is for synchronous rounds; FedBuff "
                             "(simulation.asynchronous) has no round deadline")
        return self

    @property
    def per_round(self) -> int:
        """Clients sampled each synchronous round (at least one)."""
        return max(1, round(self.fraction * self.clients))
