"""`lowband run`: a local (or joined) Ray cluster running one job, by `cluster.transport`: the coordinator
and N workers as actors (grpc), N ranks that all-gather (allgather), or one actor holding the whole run
(inproc); the DDP baseline as N ranks that all-reduce.

Gossip (`protocol.kind: gossip`) runs in process only for now: one actor holds the rendezvous and every
node as a thread (deploy/gossip_inproc.py). An actor rather than the driver, as for the coordinated
in-process runs, so Ray reserves `workers x cpus_per_worker` CPUs for it and an `--address` cluster places
it on a node with room; the driver only waits and draws the plots (consensus.png besides loss.png).

Training actors ask Ray for GPUs when `cluster.device` resolves to CUDA on the cluster (deploy/gpus.py).

The driver only schedules actors, shows progress and writes the human-facing files (summary.json,
loss.png); the coordinator actor writes config.yaml, metrics.jsonl and the checkpoints itself.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import ray
from rich.console import Console
from rich.live import Live
from rich.table import Table

from coordinator.malloc import coordinator_env
from coordinator.rundir import RunDir
from coordinator.sessions import new_run_token
from coordinator.status import tokens_per_s
from coordinator.tensorboard import write_eval_scalars
from coordinator.traffic import traffic_of, traffic_per_worker
from deploy.actors import AllGatherActor, CoordinatorActor, DDPActor, InprocActor, WorkerActor
from deploy.gpus import actor_options, plan_devices, with_device
from deploy.memory import ALLOCATOR_ENV
from deploy.report import human_bytes, plot_consensus, plot_loss, plot_utilization, round_line, span_rows
from protocols.config import RunConfig, with_cluster

log = logging.getLogger(__name__)
# Long enough for every worker to pull the final state and evaluate it.
FINAL_EVAL_GRACE_S = 120.0


def start_ray(cfg: RunConfig, address: str | None) -> None:
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    runtime_env = {"env_vars": dict(ALLOCATOR_ENV)}
    if address:
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING, runtime_env=runtime_env)
        return
    needed = cfg.cluster.workers * cfg.cluster.cpus_per_worker
    ray.init(
        num_cpus=max(os.cpu_count() or 1, int(needed + 0.999)),
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.WARNING,
        runtime_env=runtime_env,
    )


class LaunchError(RuntimeError):
    """Ray could not start the run's actors; nothing was trained and no summary was written."""


def _await_started(refs: list[Any], actors: list[Any], cfg: RunConfig, what: str) -> list[Any]:
    """The values of the actors' first calls, or LaunchError (actors killed) if Ray did not start them in time."""
    timeout_s = cfg.cluster.actor_start_timeout_s
    try:
        return list(ray.get(refs, timeout=timeout_s))
    except ray.exceptions.GetTimeoutError:
        for actor in actors:
            ray.kill(actor)
        cpus = ray.cluster_resources().get("CPU", 0)
        raise LaunchError(
            f"Ray did not start the {what} within cluster.actor_start_timeout_s={timeout_s:g} s. The run asks "
            f"for {cfg.cluster.workers} workers x cluster.cpus_per_worker={cfg.cluster.cpus_per_worker:g} CPUs "
            f"and the Ray cluster has {cpus:g} CPUs; see `ray status`, or lower cluster.workers or "
            f"cluster.cpus_per_worker"
        ) from None


def _cluster_gpus() -> float:
    return float(ray.cluster_resources().get("GPU", 0.0))


def _training_options(cfg: RunConfig, num_cpus: float) -> dict[str, Any]:
    """Ray options of a training actor: `num_cpus`, and its share of the GPUs when the run trains on CUDA."""
    return actor_options(num_cpus, plan_devices(cfg, _cluster_gpus()))


def _threads(cfg: RunConfig) -> int:
    return max(1, int(cfg.cluster.cpus_per_worker))


def _progress_table(cfg: RunConfig, prog: dict[str, Any], started: float) -> Table:
    """The live table: a row a worker, its losses as they come (the eval loss its latest update reported), its
    speed and its bytes both ways, with the protocol's own share (updates up, aggregates down)."""
    table = Table(title=f"{cfg.name}: round {prog['round']}/{prog['rounds']} ({prog['phase']}) "
                        f"{time.monotonic() - started:.0f}s")
    for col in ("worker", "alive", "round", "step", "train loss", "eval loss", "tokens/s", "bytes sent",
                "bytes received", "protocol sent / recv", "resyncs"):
        table.add_column(col)
    for wid, w in sorted(prog["workers"].items()):
        loss, ev = w.get("loss"), w.get("eval_loss")
        speed = tokens_per_s(w.get("last_metrics") or {})
        table.add_row(wid, "yes" if w["alive"] else "no", str(w.get("round", "-")), str(w["step"]),
                      f"{loss:.3f}" if loss is not None else "-", f"{ev:.3f}" if ev is not None else "-",
                      f"{speed:.0f}" if speed is not None else "-",
                      human_bytes(w["bytes_sent"]), human_bytes(w["bytes_received"]),
                      f"{human_bytes(w.get('protocol_sent', 0))} / {human_bytes(w.get('protocol_received', 0))}",
                      str(w["resyncs"]))
    return table


def _working(console: Console, what: str) -> Any:
    """A spinner on a terminal; elsewhere the same words once, as a plain line (a spinner would print nothing)."""
    if not console.is_terminal:
        console.print(f"{what} ...", highlight=False, soft_wrap=True)
    return console.status(what)


def _print_closed_rounds(console: Console, records: list[dict[str, Any]], rounds: int) -> int:
    """One plain line a closed round (the same line `lowband coordinator` prints); how many were printed."""
    for record in records:
        console.print(round_line(record, rounds), highlight=False, soft_wrap=True)
    return len(records)


def merge_worker_results(summary: dict[str, Any], results: list[dict[str, Any]], started: float) -> dict[str, Any]:
    """The run summary with what the workers measured themselves: bytes both ways (every message they sent
    or received), tokens, final eval, resyncs, averaged per worker."""
    finals = [r["final_eval_loss"] for r in results if r.get("final_eval_loss") is not None]
    n = max(len(results), 1)
    sent, received = sum(r["bytes_sent"] for r in results), sum(r["bytes_received"] for r in results)
    summary.update(
        final_eval_loss=sum(finals) / len(finals) if finals else summary.get("final_eval_loss"),
        tokens=sum(r["tokens"] for r in results),
        wall_s=time.monotonic() - started,
        bytes_sent_per_worker=sent / n,
        bytes_received_per_worker=received / n,
        bytes_total_per_worker=(sent + received) / n,
        # Results of a transport that does not tell the kinds apart carry all their bytes as protocol bytes.
        traffic_per_worker=traffic_per_worker([traffic_of(r.get("traffic") or {
            "protocol_sent": r["bytes_sent"], "protocol_received": r["bytes_received"]}) for r in results]),
        resyncs=sum(r.get("resyncs", 0) for r in results),
        stale_updates=sum(r.get("stale_updates", 0) for r in results),
        worker_results=results,
    )
    return summary


def run_coordinated(cfg: RunConfig, run_dir: Path, console: Console, faults: list[dict[str, Any]] | None = None
                    ) -> dict[str, Any]:
    """A coordinator-driven protocol (diloco, ...). Returns the run summary. A run without a token gets a fresh
    one (a token is required, coordinator/sessions.py), handed to its own coordinator and workers as actor
    arguments and shown once on the console (for `lowband status`), never written to the run directory."""
    generated = ""
    if not cfg.cluster.token:
        generated = new_run_token()
        cfg = with_cluster(cfg, token=generated)
    cfg_json = cfg.model_dump(mode="json")
    # Its own allocator settings over the job's (coordinator/malloc.py): Ray merges an actor's env_vars into the job's.
    coord = CoordinatorActor.options(num_cpus=0, max_concurrency=8,  # type: ignore[attr-defined]
                                     runtime_env={"env_vars": coordinator_env()}).remote(cfg_json, str(run_dir))
    [address] = _await_started([coord.start.remote()], [coord], cfg, "coordinator actor")
    token = f" --token {generated or 'TOKEN'}"  # a token given in the recipe stays out of logs
    console.print(f"coordinator listening on {address} (see it with `lowband status {address}{token}`)",
                  highlight=False, soft_wrap=True)
    workers = [WorkerActor.options(**_training_options(cfg, cfg.cluster.cpus_per_worker)).remote()  # type: ignore[attr-defined]
               for _ in range(cfg.cluster.workers)]
    _await_started([w.ready.remote() for w in workers], [*workers, coord], cfg, f"{len(workers)} worker actors")
    faults = faults or [{} for _ in workers]
    refs = [w.run.remote(address, cfg.cluster.token, _threads(cfg), f) for w, f in zip(workers, faults, strict=True)]
    finish = coord.finish.remote(FINAL_EVAL_GRACE_S)
    started = time.monotonic()
    shown = 0  # rounds printed as plain lines (output that is not a terminal gets no live table)
    with Live(console=console, refresh_per_second=2, transient=not console.is_terminal) as live:
        pending = list(refs)
        while pending:
            _, pending = ray.wait(pending, num_returns=len(pending), timeout=0.5)
            prog = ray.get(coord.progress.remote())
            live.update(_progress_table(cfg, prog, started))
            if not console.is_terminal:
                shown += _print_closed_rounds(console, ray.get(coord.rounds_since.remote(shown)), cfg.rounds)
        if not console.is_terminal:  # the rounds that closed after the last poll
            _print_closed_rounds(console, ray.get(coord.rounds_since.remote(shown)), cfg.rounds)
    results: list[dict[str, Any]] = []
    for i, ref in enumerate(refs):
        try:
            results.append(ray.get(ref))
        except ray.exceptions.RayError as err:  # a killed worker is an expected outcome in fault runs
            console.print(f"[yellow]worker {i} did not finish: {type(err).__name__}[/yellow]")
    summary = ray.get(finish)
    for actor in [*workers, coord]:
        ray.kill(actor)
    return merge_worker_results(summary, results, started)


def _log_evals(run_dir: Path, cfg: RunConfig, evals: list[dict[str, Any]],
               ranks: list[dict[str, Any]] | None = None) -> None:
    """Eval points of a run without a coordinator (DDP, all-gather) into metrics.jsonl; with `ranks` (the
    all-gather ranks' results) also one "timing" row a round: the spans a coordinator would have logged."""
    rundir = RunDir(run_dir, cfg)
    for point in evals:
        # DDP's points carry only bytes_sent: a ring all-reduce receives as much as it sends.
        total = point["bytes_sent"] + point.get("bytes_received", point["bytes_sent"])
        rundir.log("eval", step=point["step"], tokens=point["tokens_total"], eval_loss=point["eval_loss"],
                   train_loss=point.get("train_loss"), bytes_total_per_worker=total)
    for row in span_rows(ranks or []):
        rundir.log("timing", **row)
    write_eval_scalars(run_dir, evals)


def run_allgather(cfg: RunConfig, run_dir: Path, console: Console) -> dict[str, Any]:
    """A coordinated protocol over torch all-gather: N Ray actors form a process group (file store in the
    run dir) and every rank aggregates."""
    n = cfg.cluster.workers
    store = run_dir / "allgather_store"
    store.unlink(missing_ok=True)
    actors = [AllGatherActor.options(**_training_options(cfg, cfg.cluster.cpus_per_worker)).remote()  # type: ignore[attr-defined]
              for _ in range(n)]
    _await_started([a.ready.remote() for a in actors], actors, cfg, f"{n} all-gather actors")
    started = time.monotonic()
    with _working(console, f"{cfg.name}: {cfg.protocol.kind} over all-gather, {n} ranks, {cfg.rounds} rounds"):
        results = ray.get([a.run.remote(r, n, f"file://{store}", cfg.model_dump(mode="json"), _threads(cfg))
                           for r, a in enumerate(actors)])
    for actor in actors:
        ray.kill(actor)
    _log_evals(run_dir, cfg, results[0]["evals"], results)
    summary = {"name": cfg.name, "protocol": cfg.protocol.kind, "transport": "allgather", "rounds": cfg.rounds,
               "state_hash": results[0]["state_hashes"][-1] if results[0]["state_hashes"] else ""}
    return merge_worker_results(summary, results, started)


def run_inproc_actor(cfg: RunConfig, run_dir: Path, console: Console) -> dict[str, Any]:
    """Every worker and the coordinator's state machine in one Ray actor (threads)."""
    cpus = cfg.cluster.workers * cfg.cluster.cpus_per_worker
    actor = InprocActor.options(**_training_options(cfg, cpus)).remote()  # type: ignore[attr-defined]
    _await_started([actor.ready.remote()], [actor], cfg, "in-process actor")
    started = time.monotonic()
    with _working(console, f"{cfg.name}: {cfg.protocol.kind} in process, {cfg.cluster.workers} workers"):
        summary, results = ray.get(actor.run.remote(cfg.model_dump(mode="json"), str(run_dir), _threads(cfg)))
    ray.kill(actor)
    return merge_worker_results(summary, results, started)


def run_ddp(cfg: RunConfig, run_dir: Path, console: Console) -> dict[str, Any]:
    """The DDP baseline: N Ray actors form a torch.distributed group (file store in the run dir)."""
    n = cfg.cluster.workers
    store = run_dir / "ddp_store"
    store.unlink(missing_ok=True)
    actors = [DDPActor.options(**_training_options(cfg, cfg.cluster.cpus_per_worker)).remote()  # type: ignore[attr-defined]
              for _ in range(n)]
    _await_started([a.ready.remote() for a in actors], actors, cfg, f"{n} DDP actors")
    started = time.monotonic()
    with _working(console, f"{cfg.name}: DDP with {n} workers, {cfg.train.steps} steps each"):
        results = ray.get([a.run.remote(r, n, f"file://{store}", cfg.model_dump(mode="json"), _threads(cfg),
                                         str(run_dir / "checkpoint.pt"))
                           for r, a in enumerate(actors)])
    for actor in actors:
        ray.kill(actor)
    _log_evals(run_dir, cfg, results[0]["evals"])
    return {
        "name": cfg.name,
        "protocol": "ddp",
        "rounds": cfg.train.steps,
        "final_eval_loss": results[0]["eval_loss"],
        "tokens": sum(r["tokens"] for r in results),
        "wall_s": time.monotonic() - started,
        "bytes_sent_per_worker": sum(r["bytes_sent"] for r in results) / n,
        "bytes_received_per_worker": sum(r["bytes_received"] for r in results) / n,
        "bytes_total_per_worker": sum(r["bytes_total"] for r in results) / n,
        "state_hash": results[0]["param_hash"],
        "link_delay_s_per_worker": sum(r.get("link_delay_s", 0.0) for r in results) / n,
        "workers": {f"rank{r['rank']}": {"bytes_sent": r["bytes_sent"], "bytes_received": r["bytes_received"],
                                         "tokens": r["tokens"]} for r in results},
    }


def run(cfg: RunConfig, address: str | None = None, console: Console | None = None,
        faults: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Run one job to completion and write runs/<name>/. Returns summary.json's content."""
    console = console or Console()
    run_dir = Path(cfg.run_dir).resolve() / cfg.name
    run_dir.mkdir(parents=True, exist_ok=True)
    gossip = cfg.protocol.kind == "gossip"
    if gossip and cfg.cluster.transport != "inproc":
        raise LaunchError(
            f"`lowband run` runs gossip in process only for now (set cluster.transport: inproc); for "
            f"cluster.transport {cfg.cluster.transport!r} start `lowband coordinator RECIPE` and one "
            f"`lowband worker --join HOST:PORT` per node"
        )
    if not cfg.protocol.coordinated and cfg.protocol.kind not in ("ddp", "gossip"):
        raise LaunchError(f"protocol.kind {cfg.protocol.kind!r} has no runner in `lowband run` yet")
    start_ray(cfg, address)
    # From here on cluster.device is 'cpu' or 'cuda', decided once from the Ray cluster's GPUs (deploy/gpus.py).
    cfg = with_device(cfg, plan_devices(cfg, _cluster_gpus()))
    if cfg.protocol.kind == "ddp":
        summary = run_ddp(cfg, run_dir, console)
    elif cfg.cluster.transport == "allgather":
        summary = run_allgather(cfg, run_dir, console)
    elif cfg.cluster.transport == "inproc":
        summary = run_inproc_actor(cfg, run_dir, console)
    else:
        summary = run_coordinated(cfg, run_dir, console, faults)
    summary.setdefault("transport", "allreduce" if cfg.protocol.kind == "ddp" else cfg.cluster.transport)
    summary["run_dir"] = str(run_dir)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    plot_loss(run_dir, summary)
    plot_utilization(run_dir)
    if gossip:
        plot_consensus(run_dir)
    return summary
