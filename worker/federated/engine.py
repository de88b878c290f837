"""The simulation's server side: which clients train when, in simulated time, and how their updates are
aggregated (synchronous rounds, or FedBuff).

- Synchronous: each round samples `fraction` of the clients (seeded). A sampled client drops out with
  probability `dropout`; one whose simulated time passes `deadline_s` is late: dropped, or (`late:
  stale_weight`) folded into the next round, weighted by `(1 + 1) ** -staleness_exponent`. The pool
  workers train their sampled clients and hand one partial each to `protocols.round.RoundAggregator`, the
  same pure aggregation the coordinator, the all-gather ranks and the in-process transport run; the
  aggregate is applied to the one replica, which the pool reads for the next round. Everything stays in
  one process here, so the partials go to the aggregator directly rather than through a transport's
  hand-off, which would add only locking. A round's messages are O(pool workers).
- FedBuff (Nguyen et al., arXiv:2106.06639): `concurrency` clients are in flight, each trained from the
  version current when it started and arriving after its simulated time; every `buffer_k` arrivals are
  aggregated, each weighted by `(1 + staleness) ** -staleness_exponent`, and a new version is applied.
  A dropped client never arrives and is replaced.

Either way the simulated clock advances by client times, never by sleeping.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from protocols.base import Update
from protocols.replica import Replica
from protocols.round import RoundAggregator
from protocols.simulation_config import SimulationConfig
from worker.federated.pool import ClientJob, ClientOutcome, Partial, PoolTrainer
from worker.federated.timing import client_speeds, deadline, rng, round_fates, sample_clients, staleness_weight

SEEDS = 4  # purpose id of the per-client training seeds (timing.py uses 1-3)


@dataclass
class RoundLog:
    """One aggregation: who was asked, who answered, what it cost and where the model stands."""

    round: int
    sampled: int
    dropped: int
    late: int
    aggregated: int  # client updates folded (late ones carried in included)
    carried_in: int  # late updates of the round before, folded with a staleness weight
    sim_time_s: float  # simulated clock at the aggregation
    train_loss: float | None
    messages: int  # partials (or FedBuff arrivals) the aggregator received
    mean_staleness: float = 0.0
    refused: int = 0  # client updates or pool partials refused this round (`Engine.refusals` says why)
    # What crossed between the aggregator and the pool this round, all pool workers together: the replica each
    # working pool worker read (dense; what a Ray actor is sent) and the partials (or FedBuff's single
    # updates) they sent back, refused ones included.
    bytes_sent: int = 0
    bytes_received: int = 0
    epsilon_max: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)  # server-side eval (loss, accuracy)


class Engine:
    def __init__(self, sim: SimulationConfig, seed: int, steps: np.ndarray, workers: list[PoolTrainer],
                 aggregator: RoundAggregator, noise_multiplier: float | None,
                 evaluate: Callable[[Replica], dict[str, float]]) -> None:
        self.sim, self.seed, self.workers, self.aggregator = sim, seed, workers, aggregator
        self.noise, self.evaluate = noise_multiplier, evaluate
        self.speeds = client_speeds(sim.timing, sim.clients, seed)
        self.work = steps.astype(np.float64) * sim.batch_size  # `steps[c]`: client c's local steps; work in samples
        self.deadline_s = deadline(sim.timing, self.work, self.speeds)
        self.epsilons: dict[int, float] = {}
        self.refusals: list[str] = []  # updates and partials refused, each saying why
        self.bytes_sent = [0] * len(workers)  # per pool worker, over the run (see RoundLog)
        self.bytes_received = [0] * len(workers)
        self.clock = 0.0
        self._pool = ThreadPoolExecutor(len(workers), thread_name_prefix="lowband-pool")

    @property
    def replica(self) -> Replica:
        return self.aggregator.replica

    def _job(self, client: int, round_: int, scale: float = 1.0) -> ClientJob:
        seed = int(rng(self.seed, SEEDS, round_).integers(2**62)) ^ client
        return ClientJob(client, seed, scale, self.noise)

    def _train(self, replica: Replica, jobs: list[ClientJob], fold: bool) -> list[Partial]:
        """The jobs, each on its client's pool worker, the workers in parallel. A partial that speaks for a
        client it was not given (not sampled this round, or another worker's) is refused whole: it is logged
        and nothing of it is aggregated."""
        n = len(self.workers)
        mine = [[j for j in jobs if j.client % n == w] for w in range(n)]
        futures = [(w, self._pool.submit(self.workers[w].train, replica, js, fold), js)
                   for w, js in enumerate(mine) if js]
        replica_bytes = sum(t.numel() * t.element_size() for t in replica.params.values())
        partials = []
        for w, future, given in futures:
            partial = future.result()
            self.bytes_received[w] += replica_bytes
            sent = [partial.update] if partial.update is not None else [o.update for o in partial.outcomes]
            self.bytes_sent[w] += sum(u.nbytes() for u in sent)
            strangers = sorted({o.client for o in partial.outcomes} - {j.client for j in given})
            if strangers:
                self.refusals.append(f"pool worker {w}: its partial carries client(s) {strangers[:5]} that were not "
                                     "sampled for it this round; the partial was not aggregated")
                continue
            self.refusals.extend(f"client {o.client}: {o.refused}" for o in partial.outcomes if o.refused)
            partial.outcomes = [o for o in partial.outcomes if not o.refused]
            partials.append(partial)
        return partials

    def _close(self, updates: list[Update]) -> None:
        for order, update in enumerate(updates):
            self.aggregator.submit(f"pool{order}", update, order)
        self.aggregator.close()

    def _mark(self) -> tuple[int, int, int]:
        """Where the run's counters stand: refusals, bytes sent, bytes received (a round logs the differences)."""
        return len(self.refusals), sum(self.bytes_sent), sum(self.bytes_received)

    def _log(self, log: RoundLog, outcomes: list[ClientOutcome], mark: tuple[int, int, int]) -> RoundLog:
        now = self._mark()
        log.refused, log.bytes_sent, log.bytes_received = (now[i] - mark[i] for i in range(3))
        for o in outcomes:
            if o.epsilon is not None:
                self.epsilons[o.client] = o.epsilon
        log.train_loss = float(np.mean([o.loss for o in outcomes])) if outcomes else None
        log.epsilon_max = max(self.epsilons.values()) if self.epsilons else None
        if (log.round + 1) % self.sim.eval_every == 0 or log.round + 1 == self.sim.rounds:
            log.metrics = self.evaluate(self.replica)
        return log

    def synchronous(self) -> Iterator[RoundLog]:
        carried: list[ClientOutcome] = []
        for round_ in range(self.sim.rounds):
            mark = self._mark()
            sampled = sample_clients(self.sim.clients, self.sim.per_round, round_, self.seed)
            fates = round_fates(sampled, self.work[sampled], self.speeds, self.sim.timing, round_, self.seed,
                                self.deadline_s)
            on_time = [self._job(f.client, round_) for f in fates if f.on_time]
            late = [f for f in fates if f.late]
            stale = staleness_weight(1, self.sim.timing.staleness_exponent)
            keep_late = self.sim.timing.late == "stale_weight"
            late_jobs = [self._job(f.client, round_, stale) for f in late] if keep_late else []
            partials = self._train(self.replica, on_time, fold=True)
            held = self._train(self.replica, late_jobs, fold=False) if late_jobs else []
            updates = [p.update for p in partials if p.update is not None] + [o.update for o in carried]
            outcomes = [o for p in partials for o in p.outcomes]
            waited = [f.seconds for f in fates if f.on_time]
            cutoff = self.deadline_s
            self.clock += cutoff if late and cutoff is not None else (max(waited) if waited else 0.0)
            if updates:
                self._close(updates)
            log = RoundLog(round_, len(sampled), sum(f.dropped for f in fates), len(late),
                           len(outcomes) + len(carried), len(carried), self.clock, None, len(updates))
            carried = [o for p in held for o in p.outcomes]
            yield self._log(log, outcomes + carried, mark)

    def fedbuff(self) -> Iterator[RoundLog]:
        cfg, timing = self.sim.asynchronous, self.sim.timing
        counter = itertools.count()
        # (arrival time, tie-break, version it started from, client, its outcome or None when it dropped out)
        in_flight: list[tuple[float, int, int, int, ClientOutcome | None]] = []
        busy: set[int] = set()
        draw = rng(self.seed, 5)

        def launch(n: int, version: int) -> None:
            idle = np.setdiff1d(np.arange(self.sim.clients), np.fromiter(busy, dtype=np.int64, count=len(busy)))
            chosen = np.sort(draw.choice(idle, size=min(n, idle.size), replace=False))
            jobs = [self._job(int(c), next(counter)) for c in chosen]
            for o in (o for p in self._train(self.replica, jobs, fold=False) for o in p.outcomes):
                dropped = bool(draw.random() < timing.dropout)
                busy.add(o.client)
                arrival = self.clock + float(self.work[o.client] / self.speeds[o.client])
                heapq.heappush(in_flight, (arrival, next(counter), version, o.client, None if dropped else o))

        launch(cfg.concurrency, 0)
        for version in range(self.sim.rounds):
            mark = self._mark()
            buffer: list[tuple[int, ClientOutcome]] = []
            dropped = 0
            while len(buffer) < cfg.buffer_k and in_flight:
                self.clock, _, started, client, outcome = heapq.heappop(in_flight)
                busy.discard(client)
                if outcome is None:
                    dropped += 1
                else:
                    buffer.append((version - started, outcome))
                launch(1, version)  # keep `concurrency` clients in flight, from the current version
            weights = [staleness_weight(s, timing.staleness_exponent) for s, _ in buffer]
            updates = [Update(o.update.payloads, o.update.weight * w)
                       for (_, o), w in zip(buffer, weights, strict=True)]
            if updates:
                self._close(updates)
            log = RoundLog(version, len(buffer) + dropped, dropped, 0, len(buffer), 0, self.clock, None, len(updates),
                           mean_staleness=float(np.mean([s for s, _ in buffer])) if buffer else 0.0)
            yield self._log(log, [o for _, o in buffer], mark)

    def close(self) -> None:
        self._pool.shutdown(wait=True)

