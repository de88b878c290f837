"""Coordinator scale: many workers per round against one coordinator, SparseLoCo updates of a ~10M-parameter GPT.

Contenders `workers-N` (N = 10, 100, 1000 by default): a `CoordinatorServer` in its own process, started with the
allocator environment lowband's launchers give a coordinator (coordinator/malloc.py `coordinator_env`; not with
`--no-malloc-tuning`), with a run directory as `lowband coordinator` keeps one (a checkpoint and a metrics row per
round; `cluster.workers` = `min_workers` = N, a long deadline, heartbeats every 2 s or `--heartbeat-interval`), N
real gRPC `CoordinatorClient`s multiplexed over `--client-procs` processes (a thread and a channel each; see
bench/scale_procs.py), and one heartbeat probe process. Every worker pushes a real SparseLoCo update (codec
`sparseloco`: top-64 of every 4096 entries, 2-bit values, 12-bit indices), waits for the round to close and pulls
the aggregate, for `--rounds` rounds. Each client process builds one update with the protocol's `make_update` on a
perturbed copy of the parameters and pushes it under each of its workers' ids, so the downlink's union of
coordinates covers `--client-procs` distinct updates, not N (N distinct top-k masks would make the sparse aggregate
nearly dense). The one-time state pull at join is skipped: every byte counted below is per-round traffic plus the
initial-state upload.

Columns:
- `seconds_per_round`: the median of the coordinator's metrics.jsonl `seconds` (round open to close, i.e.
  the previous aggregate's pulls plus all N pushes and folds), `seconds_per_round_per_worker` its ratio to N.
- `peak_rss_bytes`: VmHWM of the coordinator's process; `rss_over_model` its ratio to the model's fp32 bytes;
  `rss_growth_over_model` the same for the growth above its RSS after start-up (interpreter, torch, gRPC:
  `baseline_rss_bytes`), i.e. what the run itself costs.
- `coordinator_cpu_s_per_round`: the median, over the rounds after the first, of the coordinator process's CPU
  seconds (every thread) from one round's close to the next; `coordinator_cpu_s_per_round_per_worker` its ratio
  to N; `clients_cpu_s`: the client processes' CPU seconds over the whole run. The clients share the machine's
  cores with the coordinator, so on a small machine a round's wall time carries their work too (verdict
  `coordinator_cpu_at_most_linear`, beside the issue's targets). `tracked_objects_by_round`: the objects Python's
  garbage collector tracks in the coordinator (start-up's frozen ones apart) as each round closed: one that grows
  from round to round is kept per round, and every full collection walks it.
- `max_heartbeat_delay_s`: the slowest heartbeat call of the probe (every 0.1 s, its own process) while
  rounds ran; `p99_heartbeat_s` the 99th percentile. `heartbeat_split`: for the slowest of them and summed over
  those past 0.5 s, the parts spent before the coordinator's interceptor saw the call, on the loop before the
  handler ran, in the handler, and after it (bench/heartbeat_split.py).
- `max_check_s`, `max_fold_s`, `max_close_s`, `max_checkpoint_s`, `max_lock_wait_s` (and `mean_*`): the
  coordinator's own timing of decoding and checking an update (off its state lock), of what it does under that
  lock (fold, close), of the checkpoint (recording thread) and of taking the lock (bench/scale_procs.py
  `Sections`).
- `memory_by_kind`, `memory_growth_by_kind`: the coordinator's resident bytes by kind as the run ends (thread
  stacks and their count, malloc's arenas and main heap, other anonymous and file-backed pages; glibc's bytes in
  use, free but kept, and mapped: bench/proc_memory.py) and their growth over start-up;
  `memory_by_kind_at_peak`, `memory_growth_at_peak`: the same at the highest resident set sampled (taken at each
  new high by 2 MiB), so what the peak held, not only what stayed after it.
- `running_at_peak`, `max_rise_over_model`: the coordinator's resident set sampled every 10 ms: the calls
  running at the sampled peak, and per kind of call (the ones above, plus `read_push`, `initial_state`, `apply`,
  `encode_pull`) the most it rose during one call, in model sizes (bench/scale_procs.py `Sections`).
- `finished`: False when the contender was still running after `--timeout` seconds; it is then measured as
  far as it got (rounds closed, peak RSS so far, heartbeats over the whole run) and stopped.
- `bytes_sent_per_worker`, `bytes_received_per_worker`, `bytes_total_per_worker`: every byte a client moved
  (protocol, control and state traffic), per worker over the whole run, as the clients counted them.
- `update_bytes`, `protocol_sent_per_worker`, `protocol_received_per_worker`, `control_*_per_worker`: bytes per
  worker as the clients counted them (per worker over the whole run).

- `perf`, `perf_samples_per_worker_by_group` (with `--perf`): the coordinator's CPU samples from Linux perf, from its
  start-up's end to the run's (bench/perf_profile.py): in all, by group of shared objects (kernel, python, libc,
  torch, grpc, other), the top symbols, and per group over N: a group whose samples per worker grow from row to
  row is what makes a round super-linear. Sampling slows the coordinator: such a run's times are not timings.

Targets (issue 13): seconds per round grows at most linearly in workers (`seconds_per_round_per_worker` does
not grow from row to row), coordinator memory at most 3x the model at 1,000 workers, no heartbeat delayed past
its interval (2 s) by a round close.

    python -m bench.coordinator_scale --workers 10,100,1000 --rounds 3
    python -m bench.coordinator_scale --workers 10,100,1000 --rounds 2 --model quick   # per connection, not model
    python -m bench.coordinator_scale --quick
    python -m bench.coordinator_scale --workers 100,1000 --repeats 3   # each row the median of 3 interleaved runs

`--model quick` pushes the 0.1M-parameter model at the workers given: what the coordinator then holds above start-up
is what it holds per connection and per call. Its ratios and memory verdict are against that small model, so they
say nothing of the target, which is about the 10.7M one (BENCHMARKS.md compares the bytes).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from itertools import pairwise
from pathlib import Path
from typing import Any

from bench import perf_profile, proc_memory
from bench.common import comma_list, command_line, write_result
from bench.heartbeat_split import heartbeat_split
from bench.proc_memory import proc_status
from bench.scale_procs import initial_params
from coordinator.malloc import coordinator_env
from protocols.config import parse_config

COLUMNS = ["contender", "seconds_per_round", "seconds_per_round_per_worker", "coordinator_cpu_s_per_round",
           "coordinator_cpu_s_per_round_per_worker", "gc_s", "clients_cpu_s", "peak_rss_bytes", "rss_over_model",
           "rss_growth_over_model", "max_heartbeat_delay_s", "p99_heartbeat_s", "max_loop_lag_s",
           "bytes_sent_per_worker", "bytes_received_per_worker", "bytes_total_per_worker", "update_bytes",
           "protocol_sent_per_worker", "protocol_received_per_worker", "heartbeats_sent", "heartbeats_skipped",
           "wall_s"]
FULL_MODEL = {"n_layer": 6, "n_head": 6, "n_embd": 384, "block_size": 256}  # 10.7M parameters
QUICK_MODEL = {"n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 64}  # 0.1M parameters
MODELS = {"full": FULL_MODEL, "quick": QUICK_MODEL}
HEARTBEAT_INTERVAL_S = 2.0
SLOW_HEARTBEAT_S = 0.5  # a quarter of the interval: the samples `heartbeat_split` takes apart
_LOGS: dict[int, str] = {}  # pid -> its log file, quoted when it fails


def bench_config(workers: int, rounds: int, model: dict[str, int],
                 heartbeat_interval_s: float = HEARTBEAT_INTERVAL_S) -> dict[str, Any]:
    """SparseLoCo with the paper's codec; a round waits for all N (quorum N, deadline far away)."""
    return {
        "name": f"scale-{workers}",
        "model": model,
        "train": {"steps": rounds, "eval_every_steps": rounds},
        "protocol": {"kind": "sparseloco", "inner_steps": 1},
        "cluster": {"workers": workers, "min_workers": workers, "round_deadline_s": 3600,
                    "heartbeat_interval_s": heartbeat_interval_s, "heartbeat_timeout_s": 600,
                    "stream_idle_s": 600},
    }


def _wait_file(path: Path, procs: list[subprocess.Popen[bytes]], timeout: float) -> dict[str, Any]:
    _wait_path(path, procs, timeout)
    doc: dict[str, Any] = json.loads(path.read_text())
    return doc


def _wait_path(path: Path, procs: list[subprocess.Popen[bytes]], timeout: float) -> None:
    """Until `path` exists; RuntimeError with its log's tail if one of `procs` failed meanwhile."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        for p in procs:
            if p.poll() not in (None, 0):
                tail = Path(_LOGS[p.pid]).read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{p.args!r} exited {p.returncode} before {path.name} appeared:\n{tail}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {path}")
        time.sleep(0.05)


def _spawn(work: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    log = work / f"{'-'.join(args)}.log"
    proc = subprocess.Popen([sys.executable, "-m", "bench.scale_procs", *args[:1], str(work / "spec.json"),
                             *args[1:]], stdout=log.open("wb"), stderr=subprocess.STDOUT,
                            env=None if env is None else {**os.environ, **env})
    _LOGS[proc.pid] = str(log)
    return proc


def _split(workers: int, procs: int) -> list[int]:
    procs = min(procs, workers)
    return [workers // procs + (i < workers % procs) for i in range(procs)]


def run_contender(workers: int, rounds: int, model: dict[str, int], client_procs: int, work: Path,
                  timeout: float, malloc_tuning: bool = True,
                  heartbeat_interval_s: float = HEARTBEAT_INTERVAL_S, beat_always: bool = False,
                  perf: bool = False) -> dict[str, Any]:
    """One contender's row. A run still going after `timeout` seconds is measured as far as it got (rounds
    closed, the coordinator's peak RSS so far, the probe's heartbeats) and stopped: `finished` False. With `perf`,
    the coordinator is sampled by Linux perf from its start-up's end to the run's (bench/perf_profile.py)."""
    work.mkdir(parents=True)
    config = bench_config(workers, rounds, model, heartbeat_interval_s)
    spec: dict[str, Any] = {"config": config, "timeout_s": timeout, "clients": _split(workers, client_procs),
                            "malloc_tuning": malloc_tuning, "beat_always": beat_always}
    (work / "spec.json").write_text(json.dumps(spec))
    # Started as lowband's launchers start a coordinator: with its allocator's environment (coordinator/malloc.py).
    coordinator = _spawn(work, "coordinator", env=coordinator_env() if malloc_tuning else None)
    procs = [coordinator]
    sampler: subprocess.Popen[bytes] | None = None
    clients: list[dict[str, Any]] = []
    try:
        ready = _wait_file(work / "coordinator.json", procs, 300)
        if perf:
            sampler = perf_profile.attach(ready["pid"], work / "perf.data")
        spec["address"] = ready["address"]
        (work / "spec.json").write_text(json.dumps(spec))
        procs.append(_spawn(work, "probe"))
        _wait_path(work / "probe_ready", procs, 300)
        started = time.monotonic()
        procs += [_spawn(work, "clients", str(i)) for i in range(len(spec["clients"]))]
        try:
            clients = [_wait_file(work / f"clients{i}.json", procs, timeout - (time.monotonic() - started))
                       for i in range(len(spec["clients"]))]
            wall = time.monotonic() - started
            done = _wait_file(work / "coordinator_done.json", procs, 120)
        except TimeoutError:
            wall = time.monotonic() - started
            done = {"finished": False, "status": proc_status(coordinator.pid), "sections": {}}
            for p in procs[2:]:
                p.kill()
        (work / "stop_probe").touch()
        probe = _wait_file(work / "probe.json", procs[:2], 60)
    finally:
        if sampler is not None:
            perf_profile.detach(sampler)
        for p in procs:
            try:
                p.wait(timeout=30 if clients else 1)
            except subprocess.TimeoutExpired:
                p.kill()
    rows = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    seconds = [r["seconds"] for r in rows if r.get("event") == "round"]
    first, last = (min(c["started"] for c in clients), max(c["ended"] for c in clients)) if clients else (0, 1e18)
    during = [s for s in probe["samples"] if first <= s[0] <= last]  # the probe's samples while rounds ran
    beats = [lat for _, lat, ok in during if ok]
    model_bytes = sum(t.numel() * 4 for t in initial_params(parse_config(config)).values())
    peak, baseline = done["status"]["VmHWM"], ready["baseline"]["VmRSS"]
    row: dict[str, Any] = {
        "contender": f"workers-{workers}", "workers": workers, "finished": done["finished"], "rounds": len(seconds),
        "round_seconds": seconds, "peak_rss_bytes": peak, "baseline_rss_bytes": baseline,
        "model_fp32_bytes": model_bytes, "rss_over_model": peak / model_bytes,
        "rss_growth_over_model": (peak - baseline) / model_bytes,
        "max_heartbeat_delay_s": max(beats) if beats else None,
        "p99_heartbeat_s": statistics.quantiles(beats, n=100)[98] if len(beats) >= 2 else None,
        "heartbeat_samples": len(beats), "client_procs": len(spec["clients"]), "wall_s": wall,
        **done["sections"],  # max/mean seconds of check, fold, close, checkpoint, waiting for the state lock
        **done.get("memory", {}),  # the sampled peak, what ran at it, each call kind's largest rise
    }
    if "heartbeat_trace" in done:  # where the slow heartbeats waited: the probe's side or the coordinator's
        row["heartbeat_split"] = heartbeat_split(during, done["heartbeat_trace"], SLOW_HEARTBEAT_S)
    if "memory_by_kind" in done:  # resident bytes by kind at the end, and their growth over start-up
        end, start = done["memory_by_kind"], ready.get("baseline_by_kind", {})
        row["memory_by_kind"] = end
        row["memory_growth_by_kind"] = proc_memory.growth(start, end)
        if row.get("memory_by_kind_at_peak"):
            row["memory_growth_at_peak"] = proc_memory.growth(start, row["memory_by_kind_at_peak"])
    if sampler is not None:  # where the coordinator's CPU went, per worker: what grows faster than the workers
        row["perf"] = perf_profile.summary(work / "perf.data")
        row["perf_samples_per_worker_by_group"] = {group: samples / workers for group, samples
                                                   in row["perf"]["samples_by_group"].items()}
    if seconds:
        row["seconds_per_round"] = statistics.median(seconds)
        row["seconds_per_round_per_worker"] = row["seconds_per_round"] / workers
    if done["sections"].get("coordinator_cpu_s_by_round"):
        row["coordinator_cpu_s_per_round"] = statistics.median(done["sections"]["coordinator_cpu_s_by_round"])
        row["coordinator_cpu_s_per_round_per_worker"] = row["coordinator_cpu_s_per_round"] / workers
    if clients:
        traffic = {k: sum(c["traffic"][k] for c in clients) / workers for k in clients[0]["traffic"]}
        sent = sum(v for k, v in traffic.items() if k.endswith("_sent"))
        received = sum(v for k, v in traffic.items() if k.endswith("_received"))
        row |= {"bytes_sent_per_worker": sent, "bytes_received_per_worker": received,
                "bytes_total_per_worker": sent + received,
                "update_bytes": clients[0]["update_bytes"], "protocol_sent_per_worker": traffic["protocol_sent"],
                "protocol_received_per_worker": traffic["protocol_received"],
                "control_sent_per_worker": traffic["control_sent"],
                "control_received_per_worker": traffic["control_received"],
                "median_push_s": statistics.median(s for c in clients for s in c["push_s"]),
                "clients_cpu_s": sum(c["cpu_s"] for c in clients),
                "heartbeats_sent": sum(c["heartbeats"] for c in clients),
                "heartbeats_skipped": sum(c.get("heartbeats_skipped", 0) for c in clients)}
    return row


def combine_repeats(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One contender's row from its repeated runs: the run at the median seconds per round (the slower of the
    two middle ones for an even count; a run that did not finish counts as the slowest), with every run's
    seconds and coordinator CPU per round beside it, and the worst of the runs for the targets judged on a
    worst case: the slowest heartbeat and the most memory."""
    if len(runs) == 1:
        return runs[0]
    def pace(run: dict[str, Any]) -> float:
        return run.get("seconds_per_round", math.inf) if run.get("finished", True) else math.inf

    row = dict(sorted(runs, key=pace)[len(runs) // 2])
    delays = [r["max_heartbeat_delay_s"] for r in runs if r.get("max_heartbeat_delay_s") is not None]
    row |= {
        "repeats": len(runs), "finished": all(r.get("finished", True) for r in runs),
        "repeat_seconds_per_round": [r.get("seconds_per_round") for r in runs],
        "repeat_coordinator_cpu_s_per_round": [r.get("coordinator_cpu_s_per_round") for r in runs],
        "repeat_max_heartbeat_delay_s": [r.get("max_heartbeat_delay_s") for r in runs],
        "repeat_rss_growth_over_model": [r["rss_growth_over_model"] for r in runs],
        "repeat_heartbeat_split": [r.get("heartbeat_split") for r in runs],  # the row's own is its median run's
        "max_heartbeat_delay_s": max(delays) if delays else None,
        "peak_rss_bytes": max(r["peak_rss_bytes"] for r in runs),
        "rss_over_model": max(r["rss_over_model"] for r in runs),
        "rss_growth_over_model": max(r["rss_growth_over_model"] for r in runs),
    }
    return row


def verdicts(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's three targets, each met or missed, with the numbers behind it."""
    per_worker = [r.get("seconds_per_round_per_worker") for r in rows]
    # A run stopped before its rounds closed is a miss: its median covers only the rounds that did close.
    unfinished = [r["contender"] for r in rows if not r.get("finished", True)]
    timed = [t for t in per_worker if t is not None]
    linear = not unfinished and all(b <= a * 1.1 for a, b in pairwise(timed))  # 10% noise allowance
    cpu = [r.get("coordinator_cpu_s_per_round_per_worker") for r in rows]
    cpu_timed = [c for c in cpu if c is not None]
    biggest = max(rows, key=lambda r: r["workers"])
    delays = [r["max_heartbeat_delay_s"] for r in rows if r["max_heartbeat_delay_s"] is not None]
    return {
        "round_time_at_most_linear": {"met": linear, "seconds_per_round_per_worker": per_worker,
                                      "unfinished": unfinished},
        # Not the target, what explains it on this machine: the coordinator's own CPU per worker and
        # round. The clients share the same 2 cores, so wall time also carries their decoding of every pull.
        "coordinator_cpu_at_most_linear": {"met": not unfinished and len(cpu_timed) == len(rows) and all(
            b <= a * 1.1 for a, b in pairwise(cpu_timed)), "coordinator_cpu_s_per_round_per_worker": cpu},
        "memory_at_most_3x_model": {"at": biggest["contender"], "finished": biggest.get("finished", True),
                                    "rss_over_model": biggest["rss_over_model"],
                                    "rss_growth_over_model": biggest["rss_growth_over_model"],
                                    "met_total": biggest["rss_over_model"] <= 3.0,
                                    "met_growth": biggest["rss_growth_over_model"] <= 3.0},
        "heartbeat_within_interval": {"met": bool(delays) and max(delays) <= HEARTBEAT_INTERVAL_S,
                                      "max_heartbeat_delay_s": max(delays) if delays else None,
                                      "interval_s": HEARTBEAT_INTERVAL_S},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", default="10,100,1000",
                        type=lambda s: comma_list(s, int, lambda v: min(v) >= 1, "worker counts such as 10,100"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--client-procs", type=int, default=2, help="processes the clients are multiplexed over")
    parser.add_argument("--timeout", type=float, default=900.0,
                        help="per contender, seconds: a run still going is measured as far as it got, then stopped")
    parser.add_argument("--quick", action="store_true", help="4 and 8 workers, a 0.1M-parameter model, 2 rounds")
    parser.add_argument("--no-malloc-tuning", action="store_true",
                        help="the coordinator leaves glibc's malloc as it comes (it tunes it: coordinator/malloc.py)")
    parser.add_argument("--heartbeat-interval", type=float, default=HEARTBEAT_INTERVAL_S,
                        help="seconds between each worker's heartbeats (the probe's are still judged against "
                             f"{HEARTBEAT_INTERVAL_S:g} s): a longer one shows what the heartbeats cost a round")
    parser.add_argument("--beat-always", action="store_true",
                        help="every worker beats every interval, even while a long poll, pull or push of its is "
                             "open (which the coordinator counts as proof of life): as workers did before")
    parser.add_argument("--model", choices=sorted(MODELS), default="full",
                        help="the model pushed: full (10.7M parameters, the target's) or quick (0.1M): with the "
                             "quick one, what the coordinator holds above start-up is what it holds per connection "
                             "and call, not per model")
    parser.add_argument("--perf", action="store_true",
                        help="sample the coordinator with Linux perf once started (kernel and C libraries too): "
                             "each row gets `perf` and `perf_samples_per_worker_by_group`; the sampling slows it")
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs per contender, interleaved (every worker count once, then again): each row is "
                             "the median run by seconds per round, with the worst heartbeat and memory of its runs")
    parser.add_argument("--out", default="coordinator_scale", help="result name in bench/results")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.client_procs < 1 or args.repeats < 1 or not args.heartbeat_interval > 0:
        parser.error("need --rounds >= 1, --client-procs >= 1, --repeats >= 1 and --heartbeat-interval > 0")
    if len(set(args.workers)) != len(args.workers):
        parser.error("--workers: name each count once (--repeats runs each again)")
    if args.perf and (why := perf_profile.available()):
        parser.error(f"--perf: {why}")
    workers, rounds, model = ([4, 8], 2, QUICK_MODEL) if args.quick else (args.workers, args.rounds,
                                                                         MODELS[args.model])
    runs: dict[int, list[dict[str, Any]]] = {n: [] for n in workers}
    with tempfile.TemporaryDirectory(prefix="lowband-scale-") as tmp:
        for repeat in range(args.repeats):  # interleaved: a slow stretch of the machine hits every contender
            for n in workers:
                runs[n].append(run_contender(n, rounds, model, args.client_procs, Path(tmp) / f"workers-{n}-{repeat}",
                                             args.timeout, not args.no_malloc_tuning, args.heartbeat_interval,
                                             args.beat_always, args.perf))
    rows = [combine_repeats(runs[n]) for n in workers]
    write_result(args.out, command_line("bench.coordinator_scale"), rows, COLUMNS,
                 config={"rounds": rounds, "model": model, "client_procs": args.client_procs,
                         "heartbeat_interval_s": args.heartbeat_interval, "beat_always": args.beat_always,
                         "probe_judged_against_s": HEARTBEAT_INTERVAL_S, "malloc_tuning": not args.no_malloc_tuning,
                         "perf": args.perf, "repeats": args.repeats},
                 targets=verdicts(rows))


if __name__ == "__main__":
    main()
