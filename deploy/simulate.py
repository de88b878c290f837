"""`lowband simulate RECIPE`: federated clients as state, many per pool worker (worker/federated/).

Writes `runs/<name>/`: config.yaml, metrics.jsonl (a `round` row per aggregation: sampled, dropped, late,
aggregated clients, simulated time, train loss, eval metrics, the largest DP epsilon spent so far),
summary.json (with every client's epsilon under DP), `metrics.png` (eval loss and accuracy per round) and
`participation.png` (sampled, dropped, late and aggregated clients per round). A progress bar per round on a
terminal, a plain line per round otherwise.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from coordinator.rundir import RunDir
from deploy.report import _save, _two_panels
from protocols.config import RunConfig
from worker.federated.engine import RoundLog
from worker.federated.simulation import Simulation, log_row, simulation_of


def _line(log: RoundLog, rounds: int) -> str:
    metrics = " ".join(f"{k} {v:.4g}" for k, v in log.metrics.items())
    eps = f" epsilon {log.epsilon_max:.3g}" if log.epsilon_max is not None else ""
    return (f"round {log.round + 1}/{rounds}: {log.aggregated} of {log.sampled} clients aggregated "
            f"({log.dropped} dropped, {log.late} late), sim time {log.sim_time_s:.1f}s {metrics}{eps}").rstrip()


def plot_simulation(run_dir: Path, name: str, logs: list[RoundLog]) -> list[Path]:
    evaluated = [log for log in logs if log.metrics]
    fig, left, right = _two_panels(10)
    rounds = [log.round + 1 for log in evaluated]
    if evaluated and "eval_loss" in evaluated[0].metrics:
        left.plot(rounds, [log.metrics["eval_loss"] for log in evaluated], marker=".")
    if evaluated and "accuracy" in evaluated[0].metrics:
        right.plot(rounds, [log.metrics["accuracy"] for log in evaluated], marker=".")
    left.set(xlabel="round", ylabel="eval loss", title=f"{name}: server-side eval loss")
    right.set(xlabel="round", ylabel="accuracy", title="server-side accuracy")
    paths = [_save(fig, run_dir / "metrics.png")]
    fig, left, right = _two_panels(10)
    xs = [log.round + 1 for log in logs]
    for key in ("sampled", "aggregated", "dropped", "late"):
        left.plot(xs, [getattr(log, key) for log in logs], label=key)
    left.set(xlabel="round", ylabel="clients", title=f"{name}: participation per round")
    left.legend()
    right.plot(xs, [log.sim_time_s for log in logs])
    right.set(xlabel="round", ylabel="simulated seconds", title="simulated clock")
    paths.append(_save(fig, run_dir / "participation.png"))
    return paths


def simulate(cfg: RunConfig, console: Console | None = None, run_dir: Path | None = None) -> dict[str, Any]:
    """Run the simulation of `cfg`; its summary (also in `run_dir`/summary.json)."""
    console = console or Console()
    sim = simulation_of(cfg)
    out = RunDir(run_dir or Path(cfg.run_dir) / cfg.name, cfg)
    pool = None
    if sim.backend == "ray":
        from deploy.simulate_ray import ray_pool

        pool = ray_pool()
    simulation = Simulation(cfg, pool=pool)
    logs: list[RoundLog] = []
    terminal = sys.stdout.isatty()
    try:
        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("{task.fields[status]}"), TimeElapsedColumn(), console=console,
                      disable=not terminal) as progress:
            bar = progress.add_task(f"simulate {cfg.name}", total=sim.rounds, status="")
            for log in simulation.rounds():
                logs.append(log)
                out.log("round", **log_row(log))
                line = _line(log, sim.rounds)
                progress.update(bar, advance=1, status=line.split(": ", 1)[1][:80])
                if not terminal:
                    console.print(line, highlight=False)
        summary = simulation.summary(logs)
    finally:
        simulation.close()
    summary["run_dir"] = str(out.path)
    out.write_summary(summary)
    plot_simulation(out.path, cfg.name, logs)
    return summary
