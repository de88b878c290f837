"""Loopback throughput of the gRPC star (push / pull through a real coordinator) next to a gloo all-reduce,
and whole rounds of one protocol over each transport.

    python -m bench.transport [--sizes 16,256] [--repeat 3] [--warmup 2] [--chunk-mb 1] [--allocators default,tuned]
                              [--rounds 30] [--round-model 256x4]

Run it inside a loopback-only namespace: `deploy/loopback.sh .venv/bin/python -m bench.transport`.
Sizes are MiB of fp32 (2**20 bytes); rates are GB/s (1e9 bytes/s) of tensor bytes, headers excluded.

- grpc-push-<n>mb: a worker's `CoordinatorClient.push` of a DiLoCo update of n MiB (4 equal fp32 tensors),
  timed on the client from the first chunk to the reply. The coordinator reads the stream, validates the
  update (shapes, dtypes, NaN/Inf) and folds it into the round's accumulator before it replies: the real
  path. The run has two workers, so this push does *not* close the round; the second worker's push
  does, and the coordinator then runs the outer Nesterov step and re-hashes the state before replying.
  That push is reported alongside as `seconds_with_outer_step`, so the fold path and the round-closing
  path are both visible instead of blended.
- grpc-pull-<n>mb: the worker's `CoordinatorClient.pull` of the n MiB replica (the parameters: the run has
  no outer momentum; server stream, the coordinator's default 1 MiB chunks), end to end: the stream,
  reassembly, and the client's SHA-256 check. Workers pull it only to join or resync; every round they
  pull the aggregate instead.
- gloo-allreduce-<n>mb: 2 processes (torch.distributed, gloo, tcp://127.0.0.1 init) all-reduce one
  n MiB fp32 tensor; seconds per call is the slower rank's. (A bandwidth-optimal all-reduce over 2 ranks,
  a reduce-scatter then an all-gather of halves, moves n MiB each way per rank: as much as a push.)
- rounds-grpc / rounds-allgather: seconds per round of dense DiLoCo (one inner step per round, 2 workers)
  on a GPT of `--round-model`, over the gRPC star and over all-gather, through the same round loop; see
  bench/transport_rounds.py.
- `--allocators default,tuned` runs every contender under each allocator setting; rows of `tuned` end in
  `-tuned`. The gRPC path allocates fresh memory for every chunk (bytes objects, protobuf arenas, ~1 MiB
  each) and several fresh tensors per push, and on this VM the first touch of fresh 4 KiB pages costs
  ~0.2 s per 256 MiB. `tuned` changes no code, only the environment of the spawned processes (TUNED_ENV):
  glibc serves allocations up to 32 MiB from its heap and keeps freed memory (so chunk buffers are
  reused, not mmapped and faulted in again), and torch backs large tensors with transparent huge pages.

Fairness: every contender runs in fresh spawned processes. The coordinator gets its own process, as in
a real run, so server and client share no GIL; like the 2 gloo ranks, they share this machine's cores.
Each contender is warmed up (`--warmup` untimed rounds: the first touch of fresh memory is slow here)
and reports the median of `--repeat` timed runs with their min and max.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import queue
import socket
import statistics
import time
from collections.abc import Iterator
from multiprocessing.connection import Connection
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bench.common import command_line, write_result
from bench.transport_rounds import bench_rounds
from compression.payload import dense
from coordinator.server import CoordinatorServer
from deploy.memory import ALLOCATOR_ENV
from protocols.base import Update
from protocols.config import RunConfig, parse_config
from worker.client import CoordinatorClient

COLUMNS = ["contender", "megabytes", "gb_per_s", "seconds", "seconds_min", "seconds_max", "seconds_with_outer_step",
           "seconds_vs_grpc", "bytes_sent_per_round", "bytes_received_per_round", "bytes_total_per_round"]
MIB = 1 << 20
TENSORS_PER_STATE = 4  # a model-like state: a few large tensors rather than one flat buffer
KINDS = ("grpc-push", "grpc-pull", "gloo-allreduce")  # row order of the table
# Allocator settings a contender can run under: environment variables of its spawned processes.
# What lowband's own processes run with (deploy/memory.py): chunk-sized blocks from glibc's heap, freed
# ones kept there already faulted in, and 2 MiB pages for torch's large tensors.
TUNED_ENV = ALLOCATOR_ENV
ALLOCATORS: dict[str, dict[str, str]] = {"default": {}, "tuned": TUNED_ENV}


def result_row(contender: str, megabytes: int, allocator: str, times: list[float], **extra: Any) -> dict[str, Any]:
    """One table row: the median of the timed runs (`seconds`), their min and max, and GB/s at the median."""
    seconds = statistics.median(times)
    nbytes = megabytes * MIB
    suffix = "" if allocator == "default" else f"-{allocator}"
    return {
        "contender": f"{contender}-{megabytes}mb{suffix}",
        "megabytes": megabytes,
        "bytes": nbytes,
        "allocator": allocator,
        "gb_per_s": nbytes / seconds / 1e9,
        "seconds": seconds,
        "seconds_min": min(times),
        "seconds_max": max(times),
        **extra,
    }


def make_state(megabytes: int, scale: float = 1.0, seed: int = 0) -> dict[str, torch.Tensor]:
    """`TENSORS_PER_STATE` fp32 tensors [rows, 1024] of `megabytes` MiB in total, standard normal * `scale`."""
    if megabytes < 1:
        raise ValueError(f"size must be a positive whole number of MiB, got {megabytes}")
    rows = megabytes * MIB // 4 // 1024 // TENSORS_PER_STATE
    gen = torch.Generator().manual_seed(seed)
    return {f"layer{i}.weight": torch.randn(rows, 1024, generator=gen) * scale for i in range(TENSORS_PER_STATE)}


def bench_config(rounds: int) -> RunConfig:
    """Two workers, one inner step per round, deadlines so long that no timer ever closes a round."""
    return parse_config(
        {
            "name": "transport-bench",
            "train": {"steps": rounds},
            # No outer momentum: the replica a pull moves is then the parameters alone (plus two scalars).
            "protocol": {"kind": "diloco", "inner_steps": 1, "outer_momentum": 0.0},
            "cluster": {"workers": 2, "round_deadline_s": 3600, "heartbeat_timeout_s": 3600},
        }
    )


def _serve(cfg_data: dict[str, Any], conn: Connection) -> None:
    """Spawned: a CoordinatorServer on 127.0.0.1:0; sends its address, serves until told to stop, then sends
    {"cpu_s": this process's CPU seconds from the address sent to the stop} for a bench that reads it."""
    server = CoordinatorServer(parse_config(cfg_data)).start()
    serving = time.process_time()
    conn.send(server.address)
    conn.recv()
    cpu_s = time.process_time() - serving
    server.stop(grace=0.0)
    with contextlib.suppress(OSError):  # a bench that does not read it may have closed its end already
        conn.send({"cpu_s": cpu_s})


def _drive(address: str, megabytes: int, rounds: int, chunk_bytes: int, results: Any) -> None:
    """Spawned: two workers; each round one pushes (fold), the other pushes (closes), the first pulls."""
    folder, closer = (CoordinatorClient(address, chunk_bytes=chunk_bytes) for _ in range(2))
    for i, client in enumerate((folder, closer)):
        client.join(f"bench-{i}")
    folder.offer_state(make_state(megabytes))
    if folder.wait_round(-1).round != 0:
        raise RuntimeError("the coordinator did not open round 0")
    # A DiLoCo pseudo-gradient: small, finite, the shapes of the state.
    update = Update({name: dense(t) for name, t in make_state(megabytes, scale=1e-3, seed=1).items()})
    fold_s, close_s, pull_s = [], [], []
    for round_ in range(rounds):
        began = time.perf_counter()
        folder.push(round_, update, {"tokens": 0.0})
        folded = time.perf_counter()
        closer.push(round_, update, {"tokens": 0.0})
        closed = time.perf_counter()
        pulled = folder.pull().round
        fold_s.append(folded - began)
        close_s.append(closed - folded)
        pull_s.append(time.perf_counter() - closed)
        if pulled != round_ + 1:
            raise RuntimeError(f"after round {round_} closed, the pull returned round {pulled}")
    folder.close()
    closer.close()
    results.put((fold_s, close_s, pull_s))


def _collect(results: Any, procs: list[Any], count: int) -> list[Any]:
    """`count` items from `results`; raises naming the process if one dies first."""
    items: list[Any] = []
    while len(items) < count:
        try:
            items.append(results.get(timeout=1.0))
        except queue.Empty:
            dead = [(p.name, p.exitcode) for p in procs if p.exitcode not in (None, 0)]
            if dead:
                raise RuntimeError(f"benchmark process {dead[0][0]} exited with code {dead[0][1]}") from None
    return items


def _finish(procs: list[Any]) -> None:
    for p in procs:
        p.join(30)
        if p.is_alive():
            p.terminate()
            p.join()


@contextlib.contextmanager
def _allocator(name: str) -> Iterator[None]:
    """Processes spawned inside start with exactly the allocator variables of ALLOCATORS[name] set.

    They must be in the environment at process start: glibc reads its variables then, torch at its first
    allocation.
    """
    before = {key: os.environ.pop(key) for key in TUNED_ENV if key in os.environ}
    os.environ.update(ALLOCATORS[name])
    try:
        yield
    finally:
        for key in TUNED_ENV:
            os.environ.pop(key, None)
        os.environ.update(before)


def bench_grpc(megabytes: int, warmup: int, repeat: int, chunk_bytes: int, allocator: str) -> list[dict[str, Any]]:
    """The push and pull rows of one size: a coordinator process and a process driving two workers."""
    ctx = mp.get_context("spawn")
    ours, theirs = ctx.Pipe()
    results = ctx.Queue()
    with _allocator(allocator):
        server = ctx.Process(
            target=_serve,
            args=(bench_config(warmup + repeat + 1).model_dump(), theirs),
            name="coordinator",
            daemon=True,
        )
        server.start()
        procs = [server]
        try:
            if not ours.poll(120):
                raise RuntimeError(f"the coordinator process reported no address (exit code {server.exitcode})")
            args = (ours.recv(), megabytes, warmup + repeat, chunk_bytes, results)
            procs.append(ctx.Process(target=_drive, args=args, name="workers", daemon=True))
            procs[-1].start()
            ((fold_s, close_s, pull_s),) = _collect(results, procs, 1)
        finally:
            with contextlib.suppress(OSError):  # a coordinator that already died has no pipe to read
                ours.send("stop")
            _finish(procs)
    push = result_row(
        "grpc-push",
        megabytes,
        allocator,
        fold_s[warmup:],
        chunk_mib=chunk_bytes / MIB,
        seconds_with_outer_step=statistics.median(close_s[warmup:]),
    )
    pull = result_row("grpc-pull", megabytes, allocator, pull_s[warmup:], chunk_mib=1.0)
    return [push, pull]


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _gloo_rank(rank: int, init_method: str, sizes: list[int], warmup: int, repeat: int, results: Any) -> None:
    """Spawned: all-reduce each size `warmup + repeat` times; report this rank's timed seconds per size."""
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # inside the namespace, never resolve the hostname
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=2)
    try:
        for megabytes in sizes:
            tensor = torch.ones(megabytes * MIB // 4)
            times = []
            for _ in range(warmup + repeat):
                dist.barrier()  # start together, so neither rank's time includes waiting for the other
                began = time.perf_counter()
                dist.all_reduce(tensor)
                times.append(time.perf_counter() - began)
            calls = warmup + repeat  # ones, summed over 2 ranks this many times: every element is 2**calls
            if not bool((tensor == 2.0**calls).all()):
                raise RuntimeError(f"rank {rank}: {calls} all-reduces of ones did not give {2**calls} everywhere")
            results.put((rank, megabytes, times[warmup:]))
    finally:
        dist.destroy_process_group()


def bench_gloo(sizes: list[int], warmup: int, repeat: int, allocator: str) -> list[dict[str, Any]]:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    init_method = f"tcp://127.0.0.1:{free_loopback_port()}"
    with _allocator(allocator):
        procs = [
            ctx.Process(
                target=_gloo_rank,
                args=(r, init_method, sizes, warmup, repeat, results),
                name=f"gloo-rank{r}",
                daemon=True,
            )
            for r in range(2)
        ]
        for p in procs:
            p.start()
        try:
            times = {(rank, mb): seconds for rank, mb, seconds in _collect(results, procs, 2 * len(sizes))}
        finally:
            _finish(procs)
    rows = []
    for mb in sizes:
        slower = [max(a, b) for a, b in zip(times[(0, mb)], times[(1, mb)], strict=True)]
        rows.append(result_row("gloo-allreduce", mb, allocator, slower, world_size=2))
    return rows


def parse_sizes(text: str) -> list[int]:
    """'16,256' -> [16, 256]: whole, positive MiB."""
    parts = [s.strip() for s in text.split(",") if s.strip()]
    if not parts or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"--sizes must be positive whole MiB like 16,256, got {text!r}")
    return [int(p) for p in parts]


def parse_allocators(text: str) -> list[str]:
    """'default,tuned' -> ['default', 'tuned']: names from ALLOCATORS."""
    names = [s.strip() for s in text.split(",") if s.strip()]
    if not names or any(n not in ALLOCATORS for n in names):
        raise argparse.ArgumentTypeError(f"--allocators must name some of {', '.join(ALLOCATORS)}, got {text!r}")
    return names


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=parse_sizes, default=[16, 256], help="comma-separated MiB of fp32")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per contender (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs before them")
    parser.add_argument("--chunk-mb", type=float, default=1.0, help="push chunk size in MiB, 1 to 4")
    parser.add_argument("--rounds", type=int, default=30,
                        help="timed rounds of DiLoCo over grpc and over allgather (0 skips them)")
    parser.add_argument("--round-model", default="256x4", help="the GPT of the rounds rows: n_embd x n_layer")
    parser.add_argument("--rounds-only", action="store_true",
                        help="run only the rounds rows; write bench/results/transport_rounds.json")
    parser.add_argument(
        "--allocators",
        type=parse_allocators,
        default=["default", "tuned"],
        help="allocator settings to run every contender under (see above)",
    )
    args = parser.parse_args(argv)
    if args.repeat < 1 or args.warmup < 0:
        parser.error(f"--repeat must be >= 1 and --warmup >= 0, got {args.repeat} and {args.warmup}")
    if not 1 <= args.chunk_mb <= 4:
        parser.error(f"--chunk-mb must be in [1, 4], got {args.chunk_mb}")
    try:
        n_embd, n_layer = (int(x) for x in args.round_model.split("x"))
    except ValueError:
        parser.error(f"--round-model must be N_EMBDxN_LAYER like 256x4, got {args.round_model!r}")
    load_before = os.getloadavg()[0]  # other jobs on the machine disturb the timings: say how busy it was
    rows = bench_rounds(args.rounds, args.warmup, n_embd, n_layer) if args.rounds > 0 else []
    if args.rounds_only:
        if not rows:
            parser.error("--rounds-only needs --rounds > 0")
        columns = ["contender", "parameters", "megabytes", "seconds", "seconds_min", "seconds_max", "seconds_vs_grpc",
                   "bytes_sent_per_round", "bytes_received_per_round", "bytes_total_per_round"]
        write_result("transport_rounds", command_line("bench.transport"), rows, columns, warmup=args.warmup,
                     load_average_1min=[load_before, os.getloadavg()[0]])
        return
    for allocator in args.allocators:
        for mb in args.sizes:
            rows += bench_grpc(mb, args.warmup, args.repeat, int(args.chunk_mb * MIB), allocator)
        rows += bench_gloo(args.sizes, args.warmup, args.repeat, allocator)
    order = list(ALLOCATORS)
    rows.sort(
        key=lambda r: (
            next((i for i, k in enumerate(KINDS) if r["contender"].startswith(k)), -1),
            order.index(r.get("allocator", "default")),
            r["megabytes"],
        )
    )
    write_result(
        "transport",
        command_line("bench.transport"),
        rows,
        COLUMNS,
        warmup=args.warmup,
        repeat=args.repeat,
        coordinator="own spawned process",
        torch_threads=torch.get_num_threads(),
        tuned_env=TUNED_ENV,
        load_average_1min=[load_before, os.getloadavg()[0]],
    )


if __name__ == "__main__":
    main()
