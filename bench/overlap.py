"""CO2 overlap vs synchronous rounds on emulated slow links, every contender side by side in one invocation.

    python -m bench.overlap [--quick] [--steps 384] [--inner-steps 8,32,128] [--bandwidths 5,20,100,1000]
                            [--contenders compute-only,ddp,...] [--no-extras] [--model small] [--out overlap]

Run it inside a loopback-only namespace: `deploy/loopback.sh .venv/bin/python -m bench.overlap`.

4 workers train the same small GPT (bench/overlap_runs.py: 2 layers, 64 wide, 108k parameters; batch 8 x 64
characters; `--model wide`: 4 layers, 128 wide, 0.8M parameters, ~8x the compute per step) for the same
number of inner steps each (`--steps`, the token budget), on every cell of a grid of inner steps H x emulated
link speed (Mbit/s each way, token bucket per direction, the bytes the transport really moved;
`link.bandwidth_mbps`). Contenders:

- compute-only: the 4 workers train and never communicate: the ceiling. Measured before the first block of
  runs (one block per link speed, then the 50%-speed runs, then the heterogeneous ones) and after each;
  a run's ceiling is the mean of the two measurements around its block (other jobs' load on a shared
  machine drifts), and the compute-only row shows the mean of them all.
- ddp: gradients all-reduced every step (torch DDP, gloo), the link holding each all-reduce for its ring
  bytes. At slow links it runs fewer steps (at most `--ddp-link-s` seconds of emulated link time, at least
  16 steps): its throughput is a rate and needs no full budget, but its eval loss is then not comparable
  and is left out (None), and its byte count is the ring accounting of the full budget.
- diloco-sync / diloco-co2: dense DiLoCo, rounds synchronous (outer lr 1.0, momentum 0.5) or overlapped
  (CO2: round t's exchange runs while round t+1 trains, `protocol.overlap.enabled`; outer lr 1.0 and no
  momentum, since a one-round-stale heavy-ball step oscillates: the "momentum" ablation shows it).
- sparseloco-sync / sparseloco-co2 / sparseloco-eager: SparseLoCo (top-64 of 4096, 2 bits, sparse
  downlink, error feedback decay 0.8: `bench.overlap_runs.SPARSELOCO_COMPRESSION` says why), synchronous,
  CO2, and CO2 with eager starts (`protocol.overlap.eager`, each worker from the replica moved by its own
  fresh update: `eager_proxy: update`).
- diloco-arrival / sparseloco-arrival: the synchronous protocol (DiLoCo's outer step with momentum 0.5), each
  round's aggregate merged after exactly 8 of the next round's inner steps (`overlap.mode: on_arrival`,
  `delay_steps` 8: `bench.overlap_runs.ARRIVAL_DELAY` says why a fixed delay); `merged_after_steps` is the
  mean step a worker merged at.

Columns: `compute_utilization` is the contender's tokens/s (all workers' tokens over the slowest worker's
training seconds, evaluation excluded) over compute-only's; `eval_loss_vs_diloco_sync` its eval loss over
synchronous DiLoCo's on the same H and link (ddp: H=32's); bytes are per worker, both directions;
`blocked_fraction` is the slowest worker's share of round time spent waiting for an exchange, and
`compute_fraction` its share computing (a utilization that needs no ceiling, so others' load moves it less).
Where the CPU went: `worker_cpu_s` is a worker process's CPU seconds over its job (session built, trained,
evaluated; in a coordinated run also joining, the protocol and the transport), the mean over the 4, beside
compute-only's around it (`ceiling_worker_cpu_s`), and `coordinator_cpu_s` the coordinator process's while it
served the run; `cpu_bound_utilization` is 4 x compute-only's over (4 x the run's + the coordinator's): the
utilization if the shared cores were all that limited the run. Where it is near `compute_utilization`, what
the run lost is CPU the protocol, the transport and the coordinator took from the training.

Extras (unless --no-extras; they need H=32 in the grid): the link speed at which synchronous DiLoCo at H=32
is at 50% utilization, interpolated between the two grid speeds that bracket it in log(1/u - 1) against
log(b) (a straight line of slope -1 if u(b) = C / (C + K/b): per-round compute C, bytes K); every contender
at that speed (H=32), CO2's ablations there (no staleness penalty, no momentum clipping, synchronous
DiLoCo's outer momentum), pass/fail of the
targets (sparseloco-co2 at >= 95% of compute-only throughput, eval loss within 2% of synchronous DiLoCo),
and a heterogeneous run: the 4 workers' links spread 10x (geometrically, centred on that speed), H=32,
with overlap and without: the whole run's utilization and each worker's (the share of its round time
spent computing, from its spans) and blocked fraction.

Writes bench/results/<out>.json and <out>.png (utilization against link speed, one panel per H).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import RESULTS, comma_list, command_line, format_table, write_result
from bench.overlap_runs import (
    ARRIVAL_DELAY,
    BATCH,
    CONTENDERS,
    COORDINATED,
    DEFAULT_MODEL,
    DILOCO_OUTER,
    MODELS,
    WORKERS,
    Measurement,
    Pool,
    measure,
    run_config,
)

REFERENCE_H = 32  # the H whose synchronous DiLoCo defines the 50%-utilization link speed
UTILIZATION_TARGET = 0.95  # sparseloco-co2 at the 50% speed, of compute-only throughput
LOSS_TARGET = 1.02  # sparseloco-co2's eval loss there, at most this times synchronous DiLoCo's
SPREAD = 10.0  # fastest / slowest link of the heterogeneous run
HETEROGENEOUS = ("diloco-sync", "diloco-co2", "sparseloco-sync", "sparseloco-co2")
ABLATIONS: dict[str, dict[str, Any]] = {
    "no-penalty": {"penalty": False},
    "no-clip": {"clip": None},
    "momentum": {"outer_momentum": DILOCO_OUTER["outer_momentum"]},  # synchronous DiLoCo's outer momentum
}
# sparseloco-arrival's other delays at the 50% point: a later fixed merge, and merging whenever it arrives.
ARRIVAL_VARIANTS: dict[str, dict[str, Any]] = {"delay-4": {"delay_steps": 4}, "delay-16": {"delay_steps": 16},
                                               "when-it-arrives": {"delay_steps": None}}
DDP_MIN_STEPS = 16
COLUMNS = ["contender", "point", "inner_steps", "link_mbps", "compute_utilization", "compute_fraction",
           "blocked_fraction", "tokens_per_s", "seconds", "eval_loss", "eval_loss_vs_diloco_sync",
           "bytes_total_per_worker", "steps", "worker_cpu_s", "coordinator_cpu_s", "cpu_bound_utilization",
           "merged_after_steps"]
HETERO_COLUMNS = ["contender", "inner_steps", "worker_link_mbps", "compute_utilization", "worker_utilization",
                  "worker_blocked_fraction", "eval_loss", "eval_loss_vs_diloco_sync", "bytes_total_per_worker"]


@dataclass
class Grid:
    """What one invocation runs (see the module docstring)."""

    steps: int = 384
    inner_steps: list[int] = field(default_factory=lambda: [8, 32, 128])
    bandwidths: list[float] = field(default_factory=lambda: [5.0, 20.0, 100.0, 1000.0])
    contenders: list[str] = field(default_factory=lambda: list(CONTENDERS))
    extras: bool = True
    ddp_link_s: float = 30.0
    # The *-arrival contenders' overlap.delay_steps (None: merge whenever the aggregate arrives).
    arrival_delay: int | None = ARRIVAL_DELAY
    model: str = DEFAULT_MODEL  # a key of bench.overlap_runs.MODELS

    def overlap_for(self, contender: str) -> dict[str, Any] | None:
        """What this grid changes in `contender`'s overlap section: the arrival delay, if it is not the default."""
        if contender.endswith("-arrival") and self.arrival_delay != ARRIVAL_DELAY:
            return {"delay_steps": self.arrival_delay}
        return None


QUICK = Grid(steps=64, inner_steps=[8], bandwidths=[20.0, 1000.0],
             contenders=["compute-only", "diloco-sync", "diloco-co2"], extras=False)


def parameters(model: str = DEFAULT_MODEL) -> int:
    """Parameters of the benchmark's GPT `model` (the corpus fixes the vocabulary)."""
    from worker.data import load_corpus
    from worker.model import GPT

    cfg = run_config("compute-only", 1, model=model)
    vocab = load_corpus(cfg.data.eval_fraction, cfg.data.max_chars).tokenizer.vocab_size
    return sum(p.numel() for p in GPT(cfg.model, vocab).parameters())


def ddp_steps(steps: int, mbps: float | None, params: int, link_s: float) -> int:
    """DDP's steps at `mbps`: the budget, or as many as `link_s` seconds of the link hold (ring all-reduce of
    fp32 gradients: 2 (W-1)/W x 4 bytes per parameter each way per step), and at least DDP_MIN_STEPS."""
    if mbps is None:
        return steps
    per_step_s = 2 * (WORKERS - 1) / WORKERS * 4 * params * 8 / (mbps * 1e6)
    return max(min(steps, DDP_MIN_STEPS), min(steps, int(link_s / per_step_s)))


def half_utilization_speed(points: list[tuple[float, float]]) -> tuple[float, str]:
    """The link speed (Mbit/s) at which utilization is 0.5, from (speed, utilization) points, and how it was
    found. With u(b) = C / (C + K/b), log(1/u - 1) = log(K/C) - log(b): a line in log(b). Between the two
    points that bracket 0.5 this interpolates that line through them (slope from the data); with no
    bracket it extrapolates from the point nearest 0.5 with the model's slope -1 (b50 = b (1/u - 1))."""
    if not points:
        raise ValueError("no points to find the 50% utilization speed from")
    pts = sorted((b, min(max(u, 1e-3), 1 - 1e-3)) for b, u in points)
    logit = [(math.log(b), math.log(1 / u - 1)) for b, u in pts]
    for (x0, y0), (x1, y1), (b0, _), (b1, _) in zip(logit, logit[1:], pts, pts[1:], strict=False):
        if y0 >= 0 >= y1 and y0 != y1:
            return math.exp(x0 + y0 * (x1 - x0) / (y0 - y1)), f"interpolated between {b0:g} and {b1:g} Mbit/s"
    b, u = min(pts, key=lambda p: abs(p[1] - 0.5))
    return b * (1 / u - 1), f"extrapolated from {b:g} Mbit/s (u = {u:.3f}) with u = C / (C + K/b): no bracket"


@dataclass
class Entry:
    """One measured run, and where it falls among the compute-only measurements."""

    contender: str
    point: str  # grid, half (the 50%-utilization speed), ablation, heterogeneous
    inner_steps: int | None
    link: float | list[float] | None
    m: Measurement
    slot: int  # index of the last compute-only measurement before it


class Runner:
    """Runs contenders on one `Pool`, keeping every measurement and every compute-only one; prints a line
    per run. Compute-only runs between blocks of runs; a run's ceiling is the mean of the compute-only
    measurements just before and just after its block, which follows slow changes in the load that other
    jobs put on the machine."""

    def __init__(self, pool: Pool, grid: Grid, params: int, log: Callable[[str], None] = print) -> None:
        self.pool, self.grid, self.params, self.log = pool, grid, params, log
        self.entries: list[Entry] = []
        self.ceilings: list[Measurement] = []
        self.failures: list[dict[str, Any]] = []

    def _measure(self, contender: str, inner_steps: int | None, link: float | list[float] | None,
                 overlap: dict[str, Any] | None, steps: int) -> Measurement | None:
        """One run; None (and the error kept in `failures`) if it failed."""
        began = time.perf_counter()
        try:
            m = measure(self.pool, contender,
                        run_config(contender, steps, inner_steps or 1, link, overlap, self.grid.model))
        except Exception as err:  # one contender failing leaves the others' rows
            self.failures.append({"contender": contender, "inner_steps": inner_steps, "link_mbps": link,
                                  "overlap": overlap, "error": str(err)[-3000:]})
            self.log(f"{contender} H={inner_steps} link={link}: FAILED {str(err).splitlines()[0]}")
            return None
        self.log(f"{contender} H={inner_steps} link={link} {overlap or ''}: {m.tokens_per_s:.0f} tokens/s over "
                 f"{m.seconds:.2f} s ({m.time_source}), eval {m.eval_loss}, {m.bytes_total_per_worker:.3g} B/worker, "
                 f"run {time.perf_counter() - began:.1f} s")
        return m

    def ceiling(self) -> None:
        """A compute-only measurement (the ceiling) between blocks of runs."""
        if (m := self._measure("compute-only", None, None, None, self.grid.steps)) is not None:
            self.ceilings.append(m)

    def run(self, contender: str, point: str, inner_steps: int | None, link: float | list[float] | None,
            overlap: dict[str, Any] | None = None, name: str | None = None) -> Measurement | None:
        """Run `contender` (ddp: fewer steps on slow links, see `ddp_steps`) and keep it as `name`."""
        steps = self.grid.steps
        if contender == "ddp":
            inner_steps = None
            if not isinstance(link, list):
                steps = ddp_steps(steps, link, self.params, self.grid.ddp_link_s)
        m = self._measure(contender, inner_steps, link, overlap, steps)
        if m is not None:
            self.entries.append(Entry(name or contender, point, inner_steps, link, m, len(self.ceilings) - 1))
        return m

    def _around(self, slot: int) -> list[Measurement]:
        """The compute-only measurements just before and after a run."""
        return self.ceilings[max(slot, 0):slot + 2]

    def ceiling_around(self, slot: int) -> float:
        """Compute-only tokens/s around a run: the mean of the measurements just before and after it."""
        near = self._around(slot)
        return sum(c.tokens_per_s for c in near) / len(near)

    def ceiling_cpu_around(self, slot: int) -> float | None:
        """Compute-only's CPU seconds per worker around a run, as `ceiling_around`."""
        near = [c.worker_cpu_s for c in self._around(slot) if c.worker_cpu_s is not None]
        return sum(near) / len(near) if near else None


def cpu_bound_utilization(m: Measurement, ceiling_cpu_s: float | None) -> float | None:
    """The utilization a run would have if the shared cores were all that limited it: the CPU the workers'
    jobs took in compute-only over the CPU they and the coordinator took in this run (same steps). Below the
    measured utilization's shortfall, the rest is time the cores were idle (waiting on the link or on others)."""
    if ceiling_cpu_s is None or m.worker_cpu_s is None or m.coordinator_cpu_s is None:
        return None
    return WORKERS * ceiling_cpu_s / (WORKERS * m.worker_cpu_s + m.coordinator_cpu_s)


def make_row(e: Entry, ceiling: float, budget_steps: int, ceiling_cpu_s: float | None = None) -> dict[str, Any]:
    """A table row of one run (`ceiling`: compute-only tokens/s around it; `ceiling_cpu_s`: compute-only's CPU
    seconds per worker around it)."""
    m = e.m
    partial = m.steps < budget_steps  # a rate from fewer steps: loss not comparable, bytes scaled to the budget
    scale = budget_steps / m.steps if partial else 1.0
    return {
        "contender": e.contender,
        "point": e.point,
        "inner_steps": e.inner_steps,
        "link_mbps": e.link,
        "compute_utilization": m.tokens_per_s / ceiling,
        "compute_fraction": m.compute_fraction,
        "blocked_fraction": m.blocked_fraction,
        "tokens_per_s": m.tokens_per_s,
        "ceiling_tokens_per_s": ceiling,
        "seconds": m.seconds,
        "eval_loss": None if partial else m.eval_loss,
        "eval_loss_vs_diloco_sync": None,
        "bytes_sent_per_worker": m.bytes_sent_per_worker * scale,
        "bytes_received_per_worker": m.bytes_received_per_worker * scale,
        "bytes_total_per_worker": m.bytes_total_per_worker * scale,
        "steps": m.steps,
        "time_source": m.time_source,
        "worker_cpu_s": m.worker_cpu_s,
        "ceiling_worker_cpu_s": ceiling_cpu_s,
        "coordinator_cpu_s": m.coordinator_cpu_s,
        "cpu_bound_utilization": None if partial else cpu_bound_utilization(m, ceiling_cpu_s),
        "merged_after_steps": m.merged_after_steps,
    }


def add_loss_ratios(rows: list[dict[str, Any]]) -> None:
    """eval_loss_vs_diloco_sync: over synchronous DiLoCo's on the same H and link (ddp: H=32's, or the first
    H's; compute-only has no link: none)."""
    sync = {(r["inner_steps"], r["link_mbps"]): r["eval_loss"] for r in rows if r["contender"] == "diloco-sync"}
    hs = sorted({h for h, _ in sync})
    for r in rows:
        h = r["inner_steps"]
        if r["contender"] == "ddp" and hs:
            h = REFERENCE_H if REFERENCE_H in hs else hs[0]
        base = sync.get((h, r["link_mbps"]))
        if r["eval_loss"] is not None and base:
            r["eval_loss_vs_diloco_sync"] = r["eval_loss"] / base


def _rounded(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def heterogeneous_row(e: Entry, ceiling: float) -> dict[str, Any]:
    """The whole run's utilization (tokens/s over compute-only's) and each worker's: the share of its round
    time it spent computing, from its spans (a worker's own tokens/s would depend on when it joined)."""
    m = e.m
    by_index = {w["index"]: w for w in m.per_worker}
    workers = [by_index.get(i, {}) for i in range(WORKERS)]
    return {
        "contender": e.contender,
        "inner_steps": e.inner_steps,
        "worker_link_mbps": e.link,
        "compute_utilization": m.tokens_per_s / ceiling,
        "worker_utilization": [_rounded(w.get("compute_fraction")) for w in workers],
        "worker_blocked_fraction": [_rounded(w.get("blocked_fraction")) for w in workers],
        "tokens_per_s": m.tokens_per_s,
        "ceiling_tokens_per_s": ceiling,
        "seconds": m.seconds,
        "eval_loss": m.eval_loss,
        "eval_loss_vs_diloco_sync": None,
        "bytes_total_per_worker": m.bytes_total_per_worker,
    }


def collect(grid: Grid, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run everything `grid` asks for; the result document's rows and extra sections (not written)."""
    unknown = [c for c in grid.contenders if c not in CONTENDERS]
    if unknown:
        raise ValueError(f"unknown contenders {unknown}; choose from {', '.join(CONTENDERS)}")
    params = parameters(grid.model)
    notes: list[str] = []
    extras: dict[str, Any] = {}
    with Pool(grid.model) as pool:
        runner = Runner(pool, grid, params, log)
        runner.ceiling()
        if not runner.ceilings:
            raise RuntimeError(f"compute-only failed: {runner.failures[-1]['error']}")
        coordinated = [c for c in grid.contenders if c in COORDINATED]
        for mbps in grid.bandwidths:  # one block per link speed
            if "ddp" in grid.contenders:
                runner.run("ddp", "grid", None, mbps)
            for h in grid.inner_steps:
                for contender in coordinated:
                    runner.run(contender, "grid", h, mbps, grid.overlap_for(contender))
            runner.ceiling()
        if grid.extras:
            extras = _extras(runner, grid, notes)
    ceiling = sum(c.tokens_per_s for c in runner.ceilings) / len(runner.ceilings)
    rows: list[dict[str, Any]] = [{
        "contender": "compute-only", "point": "ceiling", "inner_steps": None, "link_mbps": None,
        "compute_utilization": 1.0, "compute_fraction": 1.0, "blocked_fraction": 0.0, "tokens_per_s": ceiling,
        "ceiling_tokens_per_s": ceiling, "seconds": sum(c.seconds for c in runner.ceilings) / len(runner.ceilings),
        "eval_loss": runner.ceilings[0].eval_loss, "eval_loss_vs_diloco_sync": None, "bytes_sent_per_worker": 0.0,
        "bytes_received_per_worker": 0.0, "bytes_total_per_worker": 0.0, "steps": grid.steps,
        "time_source": "step loop", "coordinator_cpu_s": 0.0,
        "worker_cpu_s": statistics.fmean(c.worker_cpu_s for c in runner.ceilings if c.worker_cpu_s is not None),
        "cpu_bound_utilization": 1.0,
    }]
    rows += [make_row(e, runner.ceiling_around(e.slot), grid.steps, runner.ceiling_cpu_around(e.slot))
             for e in runner.entries if e.point != "heterogeneous"]
    add_loss_ratios(rows)
    hetero = [heterogeneous_row(e, runner.ceiling_around(e.slot)) for e in runner.entries
              if e.point == "heterogeneous"]
    sync_loss = next((r["eval_loss"] for r in hetero if r["contender"] == "diloco-sync"), None)
    for r in hetero:
        if r["eval_loss"] is not None and sync_loss:
            r["eval_loss_vs_diloco_sync"] = r["eval_loss"] / sync_loss
    if "half_utilization" in extras:
        extras["targets"] = targets(rows, extras["half_utilization"]["link_mbps"])
    if any(r["contender"] == "ddp" and r["steps"] < grid.steps for r in rows):
        notes.append(f"ddp ran fewer than the budget's {grid.steps} steps where the link is slow (at most "
                     f"{grid.ddp_link_s:g} s of emulated link time, at least {DDP_MIN_STEPS} steps; see its `steps`): "
                     "its utilization is a rate and stands, its eval_loss is left out (None) as not comparable, "
                     "and its bytes are the ring accounting scaled to the full budget")
    if any(r["time_source"] != "train_s" for r in rows if r["contender"] in COORDINATED):
        notes.append("some coordinated rows timed sum(round_seconds): this tree's WorkerResult has no train_s")
    return {
        "rows": rows,
        "heterogeneous": hetero,
        **extras,
        "failures": runner.failures,
        "notes": notes,
        "ceiling_tokens_per_s": ceiling,
        "compute_only_tokens_per_s": [c.tokens_per_s for c in runner.ceilings],
        "parameters": params,
        "model": MODELS[grid.model],
        "model_name": grid.model,
        "batch_size": BATCH,
        "workers": WORKERS,
        "steps_per_worker": grid.steps,
        "grid": {"inner_steps": grid.inner_steps, "bandwidths_mbps": grid.bandwidths, "contenders": grid.contenders},
        "dense_exchange_s_at_5mbps": 2 * 4 * params * 8 / 5e6,
    }


def _extras(runner: Runner, grid: Grid, notes: list[str]) -> dict[str, Any]:
    """The 50%-utilization speed, every contender and the ablations there, the heterogeneous run."""
    points = [(float(e.link), e.m.tokens_per_s / runner.ceiling_around(e.slot)) for e in runner.entries
              if e.contender == "diloco-sync" and e.point == "grid" and e.inner_steps == REFERENCE_H
              and isinstance(e.link, float | int)]
    if len(points) < 2:
        notes.append(f"extras skipped: they need diloco-sync at H={REFERENCE_H} on at least 2 link speeds")
        return {}
    b50, how = half_utilization_speed(points)
    b50 = float(f"{b50:.3g}")
    runner.log(f"synchronous DiLoCo H={REFERENCE_H} is at 50% utilization at {b50:g} Mbit/s ({how})")
    for contender in [c for c in grid.contenders if c != "compute-only"]:
        runner.run(contender, "half", REFERENCE_H, b50, grid.overlap_for(contender))
    for base in [c for c in ("diloco-co2", "sparseloco-co2") if c in grid.contenders]:
        for name, overlap in ABLATIONS.items():
            runner.run(base, "ablation", REFERENCE_H, b50, overlap, name=f"{base}-{name}")
    if "sparseloco-arrival" in grid.contenders:
        for name, overlap in ARRIVAL_VARIANTS.items():
            runner.run("sparseloco-arrival", "ablation", REFERENCE_H, b50, overlap, name=f"sparseloco-arrival-{name}")
    runner.ceiling()
    speeds = [float(f"{b50 * SPREAD ** (k / (WORKERS - 1) - 0.5):.3g}") for k in range(WORKERS)]
    for contender in [c for c in HETEROGENEOUS if c in grid.contenders]:
        runner.run(contender, "heterogeneous", REFERENCE_H, speeds)
    runner.ceiling()
    return {"half_utilization": {"link_mbps": b50, "how": how, "inner_steps": REFERENCE_H,
                                 "points": [{"link_mbps": b, "compute_utilization": u} for b, u in sorted(points)]},
            "heterogeneous_links_mbps": speeds}


def targets(rows: list[dict[str, Any]], b50: float) -> dict[str, Any]:
    """The issue's targets at the 50% speed, pass/fail (None: a row they need is missing)."""

    def at(contender: str) -> dict[str, Any] | None:
        return next((r for r in rows if r["contender"] == contender and r["point"] == "half"
                     and r["link_mbps"] == b50), None)

    co2, sync = at("sparseloco-co2"), at("diloco-sync")
    util = co2["compute_utilization"] if co2 else None
    loss = co2["eval_loss"] / sync["eval_loss"] if co2 and sync and co2["eval_loss"] and sync["eval_loss"] else None
    return {
        "link_mbps": b50,
        "sparseloco_co2_utilization": {"value": util, "target": f">= {UTILIZATION_TARGET}",
                                       "pass": None if util is None else util >= UTILIZATION_TARGET},
        "sparseloco_co2_eval_loss_vs_diloco_sync": {"value": loss, "target": f"<= {LOSS_TARGET}",
                                                    "pass": None if loss is None else loss <= LOSS_TARGET},
    }


def plot(doc: dict[str, Any], path: Path) -> Path:
    """Utilization against link speed per contender, one panel per H (ddp, H-free, in every panel)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = doc["rows"]
    hs = doc["grid"]["inner_steps"]
    fig, axes = plt.subplots(1, len(hs), figsize=(5 * len(hs), 4), sharey=True, squeeze=False)
    b50 = doc.get("half_utilization", {}).get("link_mbps")
    for ax, h in zip(axes[0], hs, strict=True):
        for contender in [c for c in CONTENDERS if c != "compute-only"]:
            mine = [r for r in rows if r["contender"] == contender and (contender == "ddp" or r["inner_steps"] == h)]
            grid_pts = sorted((r["link_mbps"], r["compute_utilization"]) for r in mine if r["point"] == "grid")
            if grid_pts:
                xs, ys = zip(*grid_pts, strict=True)
                (line,) = ax.plot(xs, ys, marker="o", label=contender, linestyle="--" if contender == "ddp" else "-")
                half = [(r["link_mbps"], r["compute_utilization"]) for r in mine if r["point"] == "half"]
                if half and h == REFERENCE_H:  # the runs at the 50% speed: stars, not on the line
                    ax.plot(*zip(*half, strict=True), marker="*", markersize=12, linestyle="", color=line.get_color())
        ax.axhline(1.0, color="black", linewidth=1, label="compute-only")
        ax.axhline(0.5, color="grey", linewidth=0.5, linestyle=":")
        if b50 is not None and h == REFERENCE_H:
            ax.axvline(b50, color="grey", linewidth=0.5, linestyle=":")
        ax.set(xscale="log", xlabel="link, Mbit/s each way", title=f"H = {h}")
    axes[0][0].set_ylabel("tokens/s over compute-only")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _ints(text: str) -> list[int]:
    return comma_list(text, int, lambda v: min(v) >= 1, "positive whole numbers like 8,32,128")



def _floats(text: str) -> list[float]:
    return comma_list(text, float, lambda v: min(v) > 0, "positive numbers like 5,20,100,1000")



def _contenders(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    if not names or any(n not in CONTENDERS for n in names):
        raise argparse.ArgumentTypeError(f"choose contenders from {', '.join(CONTENDERS)}, got {text!r}")
    return names


def _delay(text: str) -> int | None:
    if text.strip().lower() == "none":
        return None
    try:
        steps = int(text)
    except ValueError:
        steps = -1
    if steps < 0:
        raise argparse.ArgumentTypeError(f"an arrival delay is a number of inner steps >= 0 or 'none', got {text!r}")
    return steps


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help=f"a tiny grid for a smoke run (~1 min): {QUICK.steps} steps, H {QUICK.inner_steps}, "
                             f"{QUICK.bandwidths} Mbit/s, {', '.join(QUICK.contenders)}, no extras; "
                             "flags given beside it override these")
    parser.add_argument("--steps", type=int, help="inner steps per worker, every run (default 384)")
    parser.add_argument("--inner-steps", type=_ints, help="comma-separated H values (default 8,32,128)")
    parser.add_argument("--bandwidths", type=_floats,
                        help="comma-separated link speeds, Mbit/s each way (default 5,20,100,1000)")
    parser.add_argument("--contenders", type=_contenders,
                        help=f"comma-separated, from {','.join(CONTENDERS)} (default all; compute-only always runs)")
    parser.add_argument("--no-extras", action="store_true",
                        help="skip the 50%%-utilization runs, the ablations and the heterogeneous run")
    parser.add_argument("--ddp-link-s", type=float, default=30.0,
                        help="cap on DDP's emulated link seconds per run: fewer steps at slow links (default 30)")
    parser.add_argument("--arrival-delay", type=_delay, default=ARRIVAL_DELAY,
                        help=f"the *-arrival contenders' overlap.delay_steps: inner steps before the merge, or "
                             f"'none' to merge whenever the aggregate arrives (default {ARRIVAL_DELAY})")
    parser.add_argument("--model", choices=sorted(MODELS), default=DEFAULT_MODEL,
                        help="the GPT every run trains: small (2 layers, 64 wide, 108k parameters; the grid's) or "
                             f"wide (4 layers, 128 wide, 0.8M: ~8x the compute per step; default {DEFAULT_MODEL})")
    parser.add_argument("--out", help="result name in bench/results (default overlap; overlap_quick with --quick)")
    args = parser.parse_args(argv)
    base = QUICK if args.quick else Grid()
    grid = Grid(
        steps=args.steps or base.steps,
        inner_steps=args.inner_steps or base.inner_steps,
        bandwidths=args.bandwidths or base.bandwidths,
        contenders=args.contenders or base.contenders,
        extras=base.extras and not args.no_extras,
        ddp_link_s=args.ddp_link_s,
        arrival_delay=args.arrival_delay,
        model=args.model,
    )
    if grid.steps < 1:
        parser.error(f"--steps must be >= 1, got {grid.steps}")
    out = args.out or ("overlap_quick" if args.quick else "overlap")
    load_before = os.getloadavg()[0]  # other jobs on the machine disturb the timings: say how busy it was
    began = time.perf_counter()
    doc = collect(grid)
    rows = doc.pop("rows")
    RESULTS.mkdir(parents=True, exist_ok=True)
    plot({**doc, "rows": rows}, RESULTS / f"{out}.png")
    if doc["heterogeneous"]:
        print(format_table(doc["heterogeneous"], HETERO_COLUMNS) + "\n")
    write_result(out, command_line("bench.overlap"), rows, COLUMNS, **doc,
                 baseline="compute-only (utilization), diloco-sync on the same H and link (eval loss)",
                 invocation_s=time.perf_counter() - began, load_average_1min=[load_before, os.getloadavg()[0]])
    for key in ("half_utilization", "targets"):
        if key in doc:
            print(f"{key}: {doc[key]}")
    if doc["failures"]:
        print(f"{len(doc['failures'])} run(s) failed: see 'failures' in the JSON")


if __name__ == "__main__":
    main()
