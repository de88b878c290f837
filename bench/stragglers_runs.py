"""One contender's run for `bench.stragglers`: its config, and what the run measured (`Run`).

Runs on `bench.overlap_runs.Pool` (4 spawned worker processes) against a fresh coordinator process
(`bench.transport._serve`) on loopback, as bench.overlap's coordinated contenders do.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

from protocols.config import RunConfig, parse_config
from worker.loop import WorkerResult

CONTENDERS = ("uniform", "stragglers-wait", "stragglers-fixed", "stragglers-adaptive")
STRAGGLERS = {"fraction": 0.25, "factor": 3.0}  # one worker of four, 3x slower
DILOCO = {"kind": "diloco", "outer_lr": 1.0, "outer_momentum": 0.5}  # bench.overlap's tuned outer step


@dataclass
class Run:
    """What one contender's run measured (see bench.stragglers for the columns built from it)."""

    tokens: int  # trained, all workers
    useful_tokens: int  # of those, in an aggregate (folded on time or late)
    wall_s: float  # the slowest worker's train_s
    eval_loss: float | None
    late_updates: int  # all workers' updates that missed their round
    slow_tokens_fraction: float | None  # the straggler's tokens over the fast workers' mean (None: no straggler)
    slowdowns: list[float]
    steps_per_round: dict[str, list[int]]
    round_seconds: list[float]  # the slowest worker's, per round
    rounds: int


def run_config(contender: str, steps: int, inner_steps: int, deadline_s: float | None = None) -> RunConfig:
    """`contender`'s config: the shared model, data and budget (bench.overlap_runs), its straggler controls.
    `deadline_s`: the fixed deadline of stragglers-fixed and stragglers-adaptive (None: an hour)."""
    from bench.overlap_runs import BATCH, EVAL_BATCHES, MAX_CHARS, MODEL, WORKERS

    if contender not in CONTENDERS:
        raise ValueError(f"unknown contender {contender!r}; choose from {', '.join(CONTENDERS)}")
    # Deadlines so long that no timer closes a round unless the contender says so.
    cluster: dict[str, Any] = {"workers": WORKERS, "round_deadline_s": 3600, "heartbeat_timeout_s": 3600}
    protocol: dict[str, Any] = {**DILOCO, "inner_steps": inner_steps}
    if contender in ("stragglers-fixed", "stragglers-adaptive"):
        cluster.update(min_workers=WORKERS - 1, round_deadline_s=deadline_s or 3600, late="drop")
    if contender == "stragglers-adaptive":
        protocol["adaptive_inner_steps"] = True
    return parse_config({
        "name": f"stragglers-{contender}",
        "model": MODEL,
        "data": {"batch_size": BATCH, "max_chars": MAX_CHARS},
        "train": {"steps": steps, "eval_batches": EVAL_BATCHES, "eval_every_steps": 1_000_000},
        "protocol": protocol,
        "cluster": cluster,
        "faults": {"stragglers": STRAGGLERS} if contender != "uniform" else {},
    })


def summarize(results: list[WorkerResult]) -> Run:
    """A `Run` from the 4 workers' results."""
    from bench.overlap_runs import train_seconds

    timed = [train_seconds(r)[0] for r in results]
    slowest = max(range(len(results)), key=lambda i: timed[i])
    slow = [r for r in results if r.slowdown > 1.0]
    fast = [r for r in results if r.slowdown == 1.0]
    fraction = None
    if slow and fast:
        fraction = statistics.mean(r.tokens for r in slow) / statistics.mean(r.tokens for r in fast)
    losses = [r.final_eval_loss for r in results if r.final_eval_loss is not None]
    return Run(
        tokens=sum(r.tokens for r in results),
        useful_tokens=sum(r.tokens - r.dropped_tokens for r in results),
        wall_s=timed[slowest],
        eval_loss=losses[0] if losses else None,
        late_updates=sum(r.stale_updates for r in results),
        slow_tokens_fraction=fraction,
        slowdowns=[r.slowdown for r in sorted(results, key=lambda r: r.worker_id)],
        steps_per_round={r.worker_id: r.steps_per_round for r in results},
        round_seconds=list(results[slowest].round_seconds),
        rounds=max(r.rounds for r in results),
    )


def measure(pool: Any, cfg: RunConfig) -> Run:
    """A fresh coordinator process on loopback and the pool's 4 workers, to the end."""
    from bench.overlap_runs import run_coordinated

    return summarize(run_coordinated(pool, cfg))
