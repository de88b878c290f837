"""One contender's run for `bench.overlap`: its config, the processes it runs on, and what it measured.

Every run trains `steps` inner steps per worker on the same model and data, on 4 processes with one torch
thread each (the `Pool`: spawned once per invocation, sharing this machine's cores, a fresh `Session` in
each per run), and reports a `Measurement`: the tokens all workers trained on, the seconds that took
(`seconds`, below), the final eval loss and the bytes each worker moved both ways.

- compute-only: each process builds a worker `Session` and takes `steps` trainer steps, no exchange, all
  starting together behind a barrier; `seconds` is the slowest process's step loop. Its eval loss is
  worker 0's local model (it never averaged with anyone).
- ddp: `worker.ddp.run_ddp_local` in 4 fresh processes, not the pool (see `measure_ddp`): gradients
  all-reduced every step over gloo on loopback; `seconds` is the slowest rank's training loop less its
  evaluations (`wall_s - eval_s`).
- the coordinated contenders: a fresh coordinator process (`bench.transport._serve`) and the 4 processes
  as `run_grpc_worker`s on loopback, each worker's transport behind the run's emulated link; `seconds` is
  the slowest worker's `train_s` (first round's start to the last aggregate applied, evaluation excluded).
"""

from __future__ import annotations

import contextlib
import pickle
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.multiprocessing as mp

from protocols.config import RunConfig, parse_config
from worker.loop import WorkerResult

WORKERS = 4
# 2 layers, 64 wide: 108k parameters, 0.43 MB of fp32. Dense DiLoCo moves that up and again down every
# round: 6.9 Mbit, 1.4 s at 5 Mbit/s, against ~0.6 s of compute for 32 inner steps of batch 8 x 64 here
# (4 workers on 2 cores), so H=32's synchronous rounds cross 50% utilization near 10 Mbit/s.
MODEL: dict[str, Any] = {"n_layer": 2, "n_head": 4, "n_embd": 64, "block_size": 64}
# 4 layers, 128 wide: 0.8M parameters and ~8x the compute per step. `--model wide` asks whether the CPU a round's
# protocol and transport take from the training on these 2 shared cores shrinks as a share once compute grows.
# Measured: it does not, since the codec's CPU grows with the parameters too (BENCHMARKS.md, "A wider model at
# the 50% point": 442 ms a round against 48 ms).
WIDE_MODEL: dict[str, Any] = {"n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 64}
MODELS: dict[str, dict[str, Any]] = {"small": MODEL, "wide": WIDE_MODEL}
DEFAULT_MODEL = "small"  # the grid's, and what every run trains unless told otherwise
BATCH = 8
EVAL_BATCHES = 8
MAX_CHARS = 1_000_000  # of the corpus, read by every process: keeps start-up short
DILOCO_OUTER = {"outer_lr": 1.0, "outer_momentum": 0.5}  # the tuned outer step (BENCHMARKS.md)
# CO2's outer step has no momentum here: a one-round-stale heavy-ball step oscillates (the "momentum"
# ablation of bench.overlap runs CO2 with DILOCO_OUTER's momentum to show it).
CO2_OUTER = {"outer_lr": 1.0, "outer_momentum": 0.0}
# SparseLoCo's error feedback decays by 0.8 here, not the paper's 0.95 (tuned for long runs): over this budget's 12
# outer steps at H=32 the buffer's older mass acts like momentum, which a one-round-stale step turns into ringing.
# Measured in process at H=32 (BENCHMARKS.md, CO2 section): synchronous 2.487 against 2.563, CO2 2.661 against
# 2.924 (diloco-sync: 2.419).
SPARSELOCO_COMPRESSION = {"decay": 0.8}
OUTER_KEYS = ("outer_lr", "outer_momentum")  # ablation keys that change the outer step, not the overlap

CONTENDERS = (
    "compute-only",
    "ddp",
    "diloco-sync",
    "diloco-co2",
    "sparseloco-sync",
    "sparseloco-co2",
    "sparseloco-eager",
    "diloco-arrival",
    "sparseloco-arrival",
)
# On arrival, the aggregate is merged after exactly this many of the next round's 32 inner steps (the workers wait
# there for it if it is late). Merged whenever it arrived instead, it came ~21 steps late on average at the 50%
# point (the rounds no longer start together, every round closes with the slowest worker's push, and the close
# shares the two cores with the training), and the later the merge the higher the loss; 8 kept the throughput of
# merging whenever at a lower loss (BENCHMARKS.md, "Applying the aggregate on arrival").
ARRIVAL_DELAY = 8
# Contender -> (protocol kind, overlap section or None).
COORDINATED: dict[str, tuple[str, dict[str, Any] | None]] = {
    "diloco-sync": ("diloco", None),
    "diloco-co2": ("diloco", {"enabled": True}),
    "sparseloco-sync": ("sparseloco", None),
    "sparseloco-co2": ("sparseloco", {"enabled": True}),
    # The eager worker starts from the replica moved by its own whole fresh update (protocols/co2_kernels.py).
    "sparseloco-eager": ("sparseloco", {"enabled": True, "eager": True, "eager_proxy": "update"}),
    # The synchronous step, applied by each worker as soon as the aggregate arrives (protocols/arrival.py).
    "diloco-arrival": ("diloco", {"enabled": True, "mode": "on_arrival", "delay_steps": ARRIVAL_DELAY}),
    "sparseloco-arrival": ("sparseloco", {"enabled": True, "mode": "on_arrival", "delay_steps": ARRIVAL_DELAY}),
}


@dataclass
class Measurement:
    """What one run measured (see the module docstring for `seconds`)."""

    tokens: int  # all workers together
    seconds: float
    eval_loss: float | None
    bytes_sent_per_worker: float
    bytes_received_per_worker: float
    steps: int  # per worker
    time_source: str  # which figure `seconds` is
    blocked_fraction: float | None = None  # of the slowest worker's round time, waiting on an exchange
    # Of the slowest worker's round time, computing (inner steps, make_update): a utilization that needs no
    # ceiling, so load from other jobs on the machine moves it less.
    compute_fraction: float | None = None
    per_worker: list[dict[str, Any]] = field(default_factory=list)
    # CPU seconds of a worker's process over its whole job (its session built, trained, evaluated; for a
    # coordinated run also joining, the protocol and the transport), the mean over the workers; and the
    # coordinator process's while it served the run. Set against compute-only's, they say where the CPU that
    # the run's throughput lost on these shared cores went.
    worker_cpu_s: float | None = None
    coordinator_cpu_s: float | None = None
    # On arrival: after how many of a round's inner steps the previous round's aggregate was merged, the mean
    # over every worker's rounds (the delay the link and the round's close came to, in steps).
    merged_after_steps: float | None = None

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    @property
    def bytes_total_per_worker(self) -> float:
        return self.bytes_sent_per_worker + self.bytes_received_per_worker


def link_section(mbps: float | list[float] | None) -> dict[str, Any] | None:
    """The run's `link:` block: one speed for every worker, one per worker, or none (no emulation)."""
    if mbps is None:
        return None
    if isinstance(mbps, list):
        return {"workers": [{"bandwidth_mbps": float(b)} for b in mbps]}
    return {"bandwidth_mbps": float(mbps)}


def run_config(
    contender: str,
    steps: int,
    inner_steps: int = 1,
    link: float | list[float] | None = None,
    overlap: dict[str, Any] | None = None,
    model: str = DEFAULT_MODEL,
) -> RunConfig:
    """The config of `contender`: the shared model (`MODELS[model]`), data and budget; its protocol; `overlap`
    keys merged into its overlap section, or for OUTER_KEYS into its outer step (the ablations); `link` as in
    `link_section`."""
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; choose from {', '.join(MODELS)}")
    if contender in COORDINATED:
        kind, section = COORDINATED[contender]
        protocol: dict[str, Any] = {"kind": kind, "inner_steps": inner_steps}
        if kind == "diloco":
            stale = section is not None and section.get("mode", "co2") == "co2"  # CO2's one-round-stale step
            protocol.update(CO2_OUTER if stale else DILOCO_OUTER)
        else:
            protocol["compression"] = dict(SPARSELOCO_COMPRESSION)
        changes = dict(overlap or {})
        protocol.update({key: changes.pop(key) for key in OUTER_KEYS if key in changes})
        if section is not None:
            protocol["overlap"] = {**section, **changes}
        elif overlap:
            raise ValueError(f"{contender} does not overlap: no overlap settings to change")
    elif contender == "ddp":
        protocol = {"kind": "ddp"}
    elif contender == "compute-only":
        protocol = {"kind": "diloco", "inner_steps": inner_steps}  # unused: it never exchanges
    else:
        raise ValueError(f"unknown contender {contender!r}; choose from {', '.join(CONTENDERS)}")
    data: dict[str, Any] = {
        "name": f"overlap-{contender}",
        "model": MODELS[model],
        "data": {"batch_size": BATCH, "max_chars": MAX_CHARS},
        "train": {"steps": steps, "eval_batches": EVAL_BATCHES, "eval_every_steps": 1_000_000},
        "protocol": protocol,
        # Deadlines so long that no timer ever closes a round: every round waits for all 4 workers.
        "cluster": {"workers": WORKERS, "round_deadline_s": 3600, "heartbeat_timeout_s": 3600},
    }
    section = link_section(link)
    if isinstance(link, list) and section is not None:
        section["bandwidth_mbps"] = float(max(link))  # the schema's shared speed; every worker has its own here
    return parse_config({**data, "link": section})


def worker_index(worker_id: str) -> int | None:
    """The coordinator names worker i 'w<i>'."""
    digits = worker_id.removeprefix("w")
    return int(digits) if digits.isdigit() else None


def train_seconds(result: WorkerResult) -> tuple[float, str]:
    """A worker's training seconds and where they come from: `train_s` (first round's start to the last
    aggregate applied, evaluation excluded); a tree without it falls back to its rounds' seconds."""
    if result.train_s > 0:
        return result.train_s, "train_s"
    return sum(result.round_seconds), "sum(round_seconds)"


def span_fractions(result: WorkerResult) -> tuple[float | None, float | None]:
    """(compute, blocked) fractions of a worker's round time, from its spans (or its per-round seconds)."""
    if result.spans:
        wall = sum(s.get("wall_s", 0.0) for s in result.spans)
        compute = sum(s.get("compute_s", 0.0) for s in result.spans)
        blocked = sum(s.get("blocked_s", 0.0) for s in result.spans)
    else:
        wall, compute, blocked = sum(result.round_seconds), sum(result.compute_seconds), sum(result.blocked_seconds)
    if wall <= 0:
        return None, None
    return compute / wall, blocked / wall


def _pool_job(index: int, job: tuple[Any, ...], barrier: Any) -> Any:
    """One pool process's part of a run: `job` is (kind, *arguments)."""
    kind = job[0]
    if kind == "grpc":  # one `lowband worker`: join the coordinator at this address, train until it is done
        from worker.client import CoordinatorClient
        from worker.runners import run_grpc_worker

        began = time.process_time()
        client = CoordinatorClient(job[1])
        try:
            result = run_grpc_worker(client, threads=1)
        finally:
            client.close()
        return result, time.process_time() - began
    if kind == "compute":  # a worker's session and its steps, no exchange, timed from a common start
        from worker.session import Session

        cfg: RunConfig = job[1]
        cpu_began = time.process_time()
        session = Session.build(cfg, index, WORKERS, evaluates=index == 0)
        barrier.wait()  # every process built and ready: they share the cores from the first step on
        began = time.perf_counter()
        for _ in range(cfg.train.steps):
            session.trainer.step()
        seconds = time.perf_counter() - began
        eval_loss = session.evaluate() if session.eval_batches else None
        return {"rank": index, "tokens": cfg.train.steps * session.tokens_per_step, "seconds": seconds,
                "eval_loss": eval_loss, "cpu_s": time.process_time() - cpu_began}
    raise ValueError(f"unknown pool job {kind!r}")


def _pool_process(index: int, inbox: Any, results: Any, barrier: Any) -> None:
    """Spawned: runs this worker's part of every job it is sent until it gets None."""
    torch.set_num_threads(1)
    while (job := inbox.get()) is not None:
        try:
            # Plain pickle, not torch's queue reductions (see worker/spawn.py).
            results.put((index, True, pickle.dumps(_pool_job(index, job, barrier))))
        except Exception:
            results.put((index, False, traceback.format_exc()))


class Pool:
    """`WORKERS` long-lived spawned processes (one torch thread each) that play the 4 workers of every run.

    Starting 4 processes that import torch and grpc takes ~20 s on 2 cores, longer than most runs here;
    the pool pays it once. Each run still builds a fresh `Session` (model, data, optimizer, seeded the same)
    in each process, and a coordinated run gets a fresh coordinator process. A run that fails in one
    process leaves the others stuck in it: the pool then ends them all and starts afresh for the next run.
    """

    def __init__(self, model: str = DEFAULT_MODEL) -> None:
        self.procs: list[Any] = []
        self.model = model  # the warm-up's: first-touch costs of this model's sizes stay out of the timings
        self._start()

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        self.results = ctx.Queue()
        barrier = ctx.Barrier(WORKERS)
        self.inboxes = [ctx.Queue() for _ in range(WORKERS)]
        self.procs = [ctx.Process(target=_pool_process, args=(i, inbox, self.results, barrier), name=f"worker{i}",
                                  daemon=True) for i, inbox in enumerate(self.inboxes)]
        for p in self.procs:
            p.start()
        self.run(("compute", run_config("compute-only", 4, model=self.model)))  # warm-up: first-touch costs

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run(self, job: tuple[Any, ...], watch: list[Any] | None = None) -> list[Any]:
        """Every pool process's result of `job`, by pool index. Raises RuntimeError with the traceback of the
        first process that failed, or naming a process (of the pool or `watch`) that died."""
        from bench.transport import _collect

        if not self.procs:
            self._start()
        for inbox in self.inboxes:
            inbox.put(job)
        by_index: dict[int, Any] = {}
        try:
            while len(by_index) < WORKERS:
                ((index, ok, value),) = _collect(self.results, self.procs + (watch or []), 1)
                if not ok:
                    raise RuntimeError(f"worker {index} failed:\n{value}")
                by_index[index] = pickle.loads(value)
        except BaseException:
            self._kill()
            raise
        return [by_index[i] for i in range(WORKERS)]

    def _kill(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.terminate()
        for p in self.procs:
            p.join()
        self.procs = []

    def close(self) -> None:
        from bench.transport import _finish

        for inbox, p in zip(self.inboxes, self.procs, strict=True):
            if p.is_alive():
                with contextlib.suppress(OSError, ValueError):
                    inbox.put(None)
        _finish(self.procs)
        self.procs = []


@dataclass
class CoordinatedRun:
    """What `run_coordinated_measured` returns: each worker's result and the CPU seconds its process took over
    its job (pool index order), and the coordinator's CPU seconds while serving (None if it did not say)."""

    results: list[WorkerResult]
    worker_cpu_s: list[float]
    coordinator_cpu_s: float | None


def run_coordinated(pool: Pool, cfg: RunConfig) -> list[WorkerResult]:
    """A fresh coordinator process (`bench.transport._serve`) on loopback and the pool's 4 workers, to the end;
    each worker's result."""
    return run_coordinated_measured(pool, cfg).results


def run_coordinated_measured(pool: Pool, cfg: RunConfig) -> CoordinatedRun:
    """`run_coordinated`, with what each process's CPU cost."""
    from bench.transport import _finish, _serve

    ctx = mp.get_context("spawn")
    ours, theirs = ctx.Pipe()
    server = ctx.Process(target=_serve, args=(cfg.model_dump(), theirs), name="coordinator", daemon=True)
    server.start()
    coordinator_cpu_s = None
    try:
        if not ours.poll(120):
            raise RuntimeError(f"the coordinator process reported no address (exit code {server.exitcode})")
        jobs: list[tuple[WorkerResult, float]] = pool.run(("grpc", ours.recv()), watch=[server])
    finally:
        with contextlib.suppress(OSError, EOFError):  # a coordinator that already died has no pipe to read
            ours.send("stop")
            if ours.poll(30):
                coordinator_cpu_s = float(ours.recv()["cpu_s"])
        _finish([server])
    return CoordinatedRun([r for r, _ in jobs], [cpu for _, cpu in jobs], coordinator_cpu_s)


def measure_coordinated(pool: Pool, cfg: RunConfig) -> Measurement:
    """`run_coordinated`, measured."""
    run = run_coordinated_measured(pool, cfg)
    results = run.results
    timed = [train_seconds(r) for r in results]
    slowest = max(range(len(results)), key=lambda i: timed[i][0])
    per_worker = []
    for r, (seconds, _) in sorted(zip(results, timed, strict=True), key=lambda p: p[0].worker_id):
        compute, blocked = span_fractions(r)
        per_worker.append({
            "worker": r.worker_id, "index": worker_index(r.worker_id), "tokens": r.tokens, "train_s": seconds,
            "tokens_per_s": r.tokens / seconds if seconds > 0 else None, "compute_fraction": compute,
            "blocked_fraction": blocked, "bytes_total": r.bytes_total,
        })
    losses = [r.final_eval_loss for r in results if r.final_eval_loss is not None]
    return Measurement(
        tokens=sum(r.tokens for r in results),
        seconds=timed[slowest][0],
        eval_loss=losses[0] if losses else None,
        bytes_sent_per_worker=sum(r.bytes_sent for r in results) / len(results),
        bytes_received_per_worker=sum(r.bytes_received for r in results) / len(results),
        steps=max(r.steps for r in results),
        time_source=timed[slowest][1],
        compute_fraction=span_fractions(results[slowest])[0],
        blocked_fraction=span_fractions(results[slowest])[1],
        per_worker=per_worker,
        worker_cpu_s=sum(run.worker_cpu_s) / len(run.worker_cpu_s),
        coordinator_cpu_s=run.coordinator_cpu_s,
        merged_after_steps=_mean([s for r in results for s in r.merged_after_steps]),
    )


def _mean(values: list[int]) -> float | None:
    return sum(values) / len(values) if values else None


def measure_ddp(pool: Pool, cfg: RunConfig) -> Measurement:
    """`worker.ddp.run_ddp_local`: 4 gloo ranks on loopback in fresh processes (the link, if any, holds
    every all-reduce for its ring bytes). Not the pool's: a long-lived process that lets a DDP model with
    a communication hook be freed can deadlock in gloo's teardown (the destructor joins a gloo thread that
    waits for the GIL it holds), so DDP gets processes that exit after the run."""
    from worker.ddp import run_ddp_local

    del pool  # see the docstring
    summaries = run_ddp_local(cfg, WORKERS, num_threads=1, timeout_s=1800.0)
    seconds = [s["wall_s"] - s.get("eval_s", 0.0) for s in summaries]
    return Measurement(
        tokens=sum(s["tokens"] for s in summaries),
        seconds=max(seconds),
        eval_loss=summaries[0].get("eval_loss"),
        bytes_sent_per_worker=sum(s["bytes_sent"] for s in summaries) / len(summaries),
        bytes_received_per_worker=sum(s["bytes_received"] for s in summaries) / len(summaries),
        steps=max(s["steps"] for s in summaries),
        time_source="wall_s - eval_s",
        per_worker=[{"worker": f"rank{s['rank']}", "index": s["rank"], "tokens": s["tokens"], "train_s": t,
                     "tokens_per_s": s["tokens"] / t} for s, t in zip(summaries, seconds, strict=True)],
    )


def measure_compute_only(pool: Pool, cfg: RunConfig) -> Measurement:
    """The ceiling: the 4 processes train as the workers do and never communicate."""
    ranks = pool.run(("compute", cfg))
    return Measurement(
        tokens=sum(r["tokens"] for r in ranks),
        seconds=max(r["seconds"] for r in ranks),
        eval_loss=ranks[0]["eval_loss"],
        bytes_sent_per_worker=0.0,
        bytes_received_per_worker=0.0,
        steps=cfg.train.steps,
        time_source="step loop",
        blocked_fraction=0.0,
        compute_fraction=1.0,
        per_worker=[{"worker": f"p{r['rank']}", "index": r["rank"], "tokens": r["tokens"], "train_s": r["seconds"],
                     "tokens_per_s": r["tokens"] / r["seconds"]} for r in ranks],
        worker_cpu_s=sum(r["cpu_s"] for r in ranks) / len(ranks),
        coordinator_cpu_s=0.0,
    )


def measure(pool: Pool, contender: str, cfg: RunConfig) -> Measurement:
    """Run `contender` under `cfg` on the pool's processes."""
    if contender == "compute-only":
        return measure_compute_only(pool, cfg)
    if contender == "ddp":
        return measure_ddp(pool, cfg)
    return measure_coordinated(pool, cfg)
