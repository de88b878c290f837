"""Stragglers: 4-worker DiLoCo with a quarter of the workers 3x slower, four ways, side by side.

    python -m bench.stragglers [--quick] [--steps 480] [--inner-steps 32] [--out stragglers]

Run it inside a loopback-only namespace: `deploy/loopback.sh .venv/bin/python -m bench.stragglers`.

4 workers (the pool of `bench.overlap_runs`: 4 spawned processes, one torch thread each, a fresh
coordinator process per run over gRPC on loopback) train the same GPT (bench.overlap_runs.MODEL) with
DiLoCo for the same number of rounds (`--steps` / `--inner-steps`), on the same data. Contenders:

- uniform: no stragglers, every round waits for all 4 (the reference);
- stragglers-wait: `faults.stragglers: {fraction: 0.25, factor: 3}` (one worker, drawn from the seed,
  sleeps 2x each measured step), every round waits for all 4;
- stragglers-fixed: the same straggler, rounds close at a quorum of 3 plus a fixed deadline of
  DEADLINE_FACTOR x uniform's median round time; a late update is dropped (`cluster.late: drop`);
- stragglers-adaptive: stragglers-fixed with `protocol.adaptive_inner_steps` (each worker fits its inner
  steps in H x the fastest step time; token-weighted averaging).

Columns:
- `training_efficiency`: useful tokens / tokens trained, useful being the tokens of updates that went into
  an aggregate (a dropped late update's are wasted);
- `tokens_per_s`: useful tokens / `wall_s`, where `wall_s` is the slowest worker's training time (first
  round's start to the last aggregate applied, evaluation excluded);
- `wall_s_per_token_vs_uniform`: (wall_s / useful tokens) over uniform's;
- `eval_loss` (the final shared replica, the same eval batches for all) and `eval_loss_vs_uniform`;
- `late_updates`, `slow_worker_tokens_fraction` (the straggler's tokens over a fast worker's mean).

Targets (stragglers-adaptive): efficiency >= 0.95, wall time per token <= 1.1x uniform's, eval loss within
2% of uniform's. With one worker of four at a third of the speed the cluster has 3 + 1/3 workers' worth of
compute: a per-token wall time of 4 / 3.33 = 1.2x uniform's is the bound for any schedule that uses all of
it on a dedicated machine (on a shared one, the straggler's sleeps give its cores to the others).

Writes bench/results/<out>.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from bench.common import command_line, write_result
from bench.stragglers_runs import CONTENDERS, Run, measure, run_config

DEADLINE_FACTOR = 1.5  # stragglers-fixed's deadline, over uniform's median round time
EFFICIENCY_TARGET = 0.95
WALL_TARGET = 1.10
LOSS_TARGET = 1.02
COLUMNS = ["contender", "training_efficiency", "tokens_per_s", "wall_s", "wall_s_per_token_vs_uniform",
           "eval_loss", "eval_loss_vs_uniform", "useful_tokens", "tokens", "late_updates",
           "slow_worker_tokens_fraction", "deadline_s"]


@dataclass(frozen=True)
class Plan:
    steps: int = 480
    inner_steps: int = 32


QUICK = Plan(steps=24, inner_steps=6)


def row(name: str, run: Run, deadline_s: float | None) -> dict[str, Any]:
    return {
        "contender": name,
        "training_efficiency": run.useful_tokens / run.tokens if run.tokens else None,
        "tokens_per_s": run.useful_tokens / run.wall_s,
        "wall_s": run.wall_s,
        "eval_loss": run.eval_loss,
        "useful_tokens": run.useful_tokens,
        "tokens": run.tokens,
        "late_updates": run.late_updates,
        "slow_worker_tokens_fraction": run.slow_tokens_fraction,
        "slowdowns": run.slowdowns,
        "steps_per_round": run.steps_per_round,
        "deadline_s": deadline_s,
        "rounds": run.rounds,
    }


def collect(plan: Plan, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every contender (uniform first: its round time sets the fixed deadline); the result document."""
    from bench.overlap_runs import Pool

    rows: list[dict[str, Any]] = []
    began = time.perf_counter()
    load_before = os.getloadavg()  # other jobs on a shared machine move every time here
    with Pool() as pool:
        deadline_s: float | None = None
        for name in CONTENDERS:
            log(f"--- {name}")
            run = measure(pool, run_config(name, plan.steps, plan.inner_steps, deadline_s))
            rows.append(row(name, run, deadline_s if name in ("stragglers-fixed", "stragglers-adaptive") else None))
            if name == "uniform":
                deadline_s = DEADLINE_FACTOR * statistics.median(run.round_seconds)
    uniform = rows[0]
    for r in rows:
        r["wall_s_per_token_vs_uniform"] = ((r["wall_s"] / r["useful_tokens"])
                                            / (uniform["wall_s"] / uniform["useful_tokens"]))
        r["eval_loss_vs_uniform"] = r["eval_loss"] / uniform["eval_loss"] if r["eval_loss"] else None
    adaptive = next(r for r in rows if r["contender"] == "stragglers-adaptive")
    targets = {
        "training_efficiency >= 0.95": adaptive["training_efficiency"] >= EFFICIENCY_TARGET,
        "wall_s_per_token_vs_uniform <= 1.1": adaptive["wall_s_per_token_vs_uniform"] <= WALL_TARGET,
        "eval_loss_vs_uniform <= 1.02": adaptive["eval_loss_vs_uniform"] <= LOSS_TARGET,
    }
    return {"rows": rows, "targets_stragglers_adaptive": targets, "plan": asdict(plan),
            "deadline_factor": DEADLINE_FACTOR, "bench_seconds": time.perf_counter() - began,
            "load_average_1_5_15min": {"before": list(load_before), "after": list(os.getloadavg())}}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"a tiny run ({QUICK.steps} steps, H={QUICK.inner_steps})")
    parser.add_argument("--steps", type=int, default=Plan.steps, help="inner steps per worker (the budget)")
    parser.add_argument("--inner-steps", type=int, default=Plan.inner_steps, help="H")
    parser.add_argument("--out", default="stragglers", help="bench/results/<out>.json")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else Plan(args.steps, args.inner_steps)
    if plan.steps < plan.inner_steps or plan.inner_steps < 1:
        parser.error(f"--steps ({plan.steps}) must be at least --inner-steps ({plan.inner_steps}) >= 1")
    doc = collect(plan)
    write_result(args.out, command_line("bench.stragglers"), doc.pop("rows"), COLUMNS, **doc)
    print(doc["targets_stragglers_adaptive"])


if __name__ == "__main__":
    main()
