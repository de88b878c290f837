"""Who takes part in a simulated round and how long each client takes, in simulated seconds (pure, seeded).

Every draw comes from a generator seeded by (run seed, purpose, round), so a run's participation is the
same whatever the pool size, backend or machine, and one round's draws do not depend on another's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from protocols.simulation_config import ClientTimingConfig

SAMPLING, DROPOUT, SPEED = 1, 2, 3  # purposes: each its own stream


def rng(seed: int, purpose: int, round_: int = 0) -> np.random.Generator:
    return np.random.default_rng([seed, purpose, round_])


def client_speeds(cfg: ClientTimingConfig, clients: int, seed: int) -> np.ndarray:
    """Samples per simulated second of every client: lognormal around `samples_per_s`, or the trace's."""
    if cfg.trace is not None:
        path = Path(cfg.trace)
        if not path.is_file():
            raise ValueError(f"simulation.timing.trace {cfg.trace!r} does not exist")
        speeds = np.loadtxt(path, dtype=np.float64, ndmin=1)
        if speeds.size == 0 or not np.all(np.isfinite(speeds)) or np.any(speeds <= 0):
            raise ValueError(f"simulation.timing.trace {cfg.trace!r} must hold positive finite speeds, one per line")
        return np.resize(speeds, clients)  # cycled over the clients
    z = rng(seed, SPEED).standard_normal(clients)
    return cfg.samples_per_s * np.exp(cfg.sigma * z)


def sample_clients(clients: int, per_round: int, round_: int, seed: int) -> np.ndarray:
    """Round `round_`'s clients: `per_round` distinct ids, uniformly, sorted."""
    return np.sort(rng(seed, SAMPLING, round_).choice(clients, size=min(per_round, clients), replace=False))


@dataclass(frozen=True)
class Fate:
    """One sampled client's round: how long it takes, and whether it drops out or misses the deadline."""

    client: int
    seconds: float
    dropped: bool
    late: bool

    @property
    def on_time(self) -> bool:
        return not self.dropped and not self.late


def deadline(cfg: ClientTimingConfig, work: np.ndarray, speeds: np.ndarray) -> float | None:
    """The round deadline in simulated seconds: `deadline_s`, or the `deadline_quantile` of every client's
    round time (`work` samples per client at its speed); None: no deadline."""
    if cfg.deadline_quantile is not None:
        return float(np.quantile(work / speeds, cfg.deadline_quantile))
    return cfg.deadline_s


def round_fates(sampled: np.ndarray, work: np.ndarray, speeds: np.ndarray, cfg: ClientTimingConfig,
                round_: int, seed: int, deadline_s: float | None) -> list[Fate]:
    """The fate of each sampled client; `work[i]` is the samples client `sampled[i]` processes this round."""
    drops = rng(seed, DROPOUT, round_).random(len(sampled)) < cfg.dropout
    fates = []
    for client, samples, dropped in zip(sampled.tolist(), work.tolist(), drops.tolist(), strict=True):
        seconds = float(samples) / float(speeds[client])
        late = deadline_s is not None and seconds > deadline_s
        fates.append(Fate(int(client), seconds, bool(dropped), bool(late and not dropped)))
    return fates


def staleness_weight(staleness: int, exponent: float) -> float:
    """FedBuff's down-weighting of an update computed `staleness` versions ago: (1 + s) ** -exponent."""
    if staleness < 0:
        raise ValueError(f"staleness must be >= 0, got {staleness}")
    return float((1.0 + staleness) ** -exponent)
