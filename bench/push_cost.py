"""One push's CPU work on the coordinator, phase by phase, in one process (no gRPC threads, nothing else running).

The model and codec of bench/coordinator_scale.py (a 10.75M-parameter GPT, SparseLoCo's paper codec: ~315 KB per
update). `--distinct` updates (each the protocol's `make_update` on its own perturbation of the parameters, so
their top-k masks differ as real workers' do) are serialized once as PushUpdate streams; then `--pushes` pushes
of them, from as many members, each go through what the coordinator runs for one:

- `parse`: the stream's messages parsed from their bytes (gRPC's deserializer, `PushMessage.FromString`);
- `read_push`: `serde.read_push`, reassembling the payloads from the chunks;
- `check`: `CoordinatorState.submit` up to the fold (its admission under the lock, `check_update` off it);
- `fold`: `RoundAggregator.fold` under the lock.

Each is the process's CPU time (user and system: the page faults of fresh allocations are system time), so the
numbers hold on a machine busy with other work. The process's malloc is tuned as `CoordinatorServer` tunes its
own (coordinator/malloc.py: every block of 128 KiB or more is mapped afresh and its pages faulted in on first use;
its committed results were measured at the earlier 1 MiB),
unless `--no-malloc-tuning`.

No round closes (the run waits for one more member than push), so every push folds into the same round, into
SparseLoCo's accumulator in its sparse form while the distinct masks' union stays under 1/8 of the model (8 masks,
as bench/coordinator_scale.py's 8 client processes push, keep it sparse; many more turn it dense, where a fold
is one index_add). Each phase's median over the pushes is reported, and the total; `--profile` prints cProfile's
top functions over all pushes instead of writing a result.

`--grpc` (run it inside deploy/loopback.sh) pushes the same updates over gRPC instead: a `CoordinatorServer` in
this process, and in a client process one `CoordinatorClient` per member pushing one update at a time, so
nothing else runs meanwhile. The row `server_cpu` is this process's CPU time (every thread) over the pushes,
per push: what one push costs the coordinator, gRPC's own work included; the other rows are there the wall time
of the handler's calls (`read_push` includes waiting for the client's messages).

    python -m bench.push_cost --pushes 40 --distinct 8
    deploy/loopback.sh python -m bench.push_cost --pushes 40 --distinct 8 --grpc
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import pstats
import statistics
import sys
import time
from collections import defaultdict
from typing import Any

import torch

from bench.common import client_process, command_line, go, write_result
from bench.coordinator_scale import FULL_MODEL, QUICK_MODEL, bench_config
from bench.scale_procs import initial_params, one_update
from compression.payload import dense
from coordinator.malloc import tune_malloc
from coordinator.state import CoordinatorState
from protocols.base import Update
from protocols.config import PROTOCOL_VERSION, parse_config
from protocols.registry import build_protocol
from protocols.round import RoundAggregator
from protocols.wire import lowband_pb2 as pb
from protocols.wire import messages as m
from protocols.wire import serde

PHASES = ["parse", "read_push", "check", "fold", "total"]
COLUMNS = ["phase", "median_ms", "mean_ms", "min_ms", "max_ms"]


def update_streams(cfg: Any, distinct: int) -> tuple[dict[str, torch.Tensor], list[list[bytes]]]:
    """The initial parameters, and `distinct` updates' PushUpdate streams as the bytes gRPC hands over."""
    params = initial_params(cfg)
    streams = []
    for k in range(distinct):
        update = one_update(cfg, params, seed=1 + k)
        header = m.PushHeader(envelope=m.Envelope("", "", 0, PROTOCOL_VERSION, ""), kind=m.PushKind.UPDATE,
                              weight=update.weight, num_entries=len(update.payloads),
                              total_bytes=sum(p.nbytes() for p in update.payloads.values()))
        streams.append([msg.SerializeToString() for msg in serde.push_stream(header, update.payloads)])
    return params, streams


def measure(pushes: int, distinct: int, profile: bool, model: dict[str, int] = FULL_MODEL
            ) -> tuple[dict[str, list[float]], dict[str, Any]]:
    cfg = parse_config(bench_config(pushes + 1, 1, model))
    params, streams = update_streams(cfg, distinct)
    state = CoordinatorState(cfg, build_protocol(cfg))
    members = [state.join_session(f"h{i}", "", PROTOCOL_VERSION)[0] for i in range(pushes + 1)]
    state.offer_initial_state(members[0].worker_id, "", {n: dense(t) for n, t in params.items()})
    seconds: dict[str, list[float]] = defaultdict(list)
    fold = RoundAggregator.fold

    def timed_fold(*args: Any, **kwargs: Any) -> None:
        t0 = time.process_time()
        try:
            fold(*args, **kwargs)
        finally:
            seconds["fold"].append(time.process_time() - t0)

    RoundAggregator.fold = timed_fold  # type: ignore[method-assign]
    profiler = cProfile.Profile() if profile else None
    try:
        for i in range(pushes):
            data = streams[i % distinct]
            if profiler is not None:
                profiler.enable()
            t0 = time.process_time()
            messages = [pb.PushMessage.FromString(b) for b in data]
            t1 = time.process_time()
            header, payloads = serde.read_push(iter(messages), state.max_push_bytes)
            t2 = time.process_time()
            update = Update(payloads=payloads, weight=header.weight, base=header.base_state_hash)
            state.submit(members[i].worker_id, "", 0, update, {"tokens": 0.0}, sum(map(len, data)))
            t3 = time.process_time()
            if profiler is not None:
                profiler.disable()
            seconds["parse"].append(t1 - t0)
            seconds["read_push"].append(t2 - t1)
            seconds["check"].append(t3 - t2 - seconds["fold"][-1])
            seconds["total"].append(t3 - t0)
    finally:
        RoundAggregator.fold = fold  # type: ignore[method-assign]
    if profiler is not None:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(30)
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(40)
    assert state.aggregator is not None
    acc = state.aggregator.acc
    info = {"update_bytes": [sum(map(len, s)) for s in streams], "messages_per_push": [len(s) for s in streams],
            "tensors": len(params), "parameters": sum(t.numel() for t in params.values()),
            "accumulator_sparse_at_end": bool(getattr(acc, "sparse", False)), "folded": len(state.aggregator.senders)}
    return seconds, info


def measure_grpc(pushes: int, distinct: int, model: dict[str, int] = FULL_MODEL
                 ) -> tuple[dict[str, list[float]], dict[str, Any]]:
    import coordinator.state
    from coordinator.server import CoordinatorServer

    cfg = parse_config(bench_config(pushes + 1, 1, model))
    seconds: dict[str, list[float]] = defaultdict(list)
    originals = [(serde, "read_push", "read_push"), (RoundAggregator, "fold", "fold"),
                 (coordinator.state.CoordinatorState, "submit", "submit")]
    for owner, name, key in originals:
        setattr(owner, name, _timed(getattr(owner, name), seconds[key]))
    server = CoordinatorServer(cfg).start()
    quick = ["--quick"] if model == QUICK_MODEL else []
    client = None
    try:
        client = client_process("bench.push_cost", server.address, "--pushes", str(pushes), "--distinct",
                                str(distinct), *quick)
        for key in seconds:
            seconds[key].clear()  # the initial state's read_push
        cpu0, wall0 = time.process_time(), time.perf_counter()
        go(client)
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        assert server.state.aggregator is not None
        folded = len(server.state.aggregator.senders)
    finally:
        if client is not None:
            client.kill()
            client.wait()
        server.stop()
        for owner, name, _ in originals:
            setattr(owner, name, getattr(owner, name).__wrapped__)
    seconds["check"] = [s - f for s, f in zip(seconds.pop("submit"), seconds["fold"], strict=True)]
    seconds["server_cpu"] = [cpu / pushes] * pushes
    seconds["wall"] = [wall / pushes] * pushes
    return seconds, {"server_cpu_s": cpu, "wall_s": wall, "folded": folded}


def _timed(fn: Any, into: list[float]) -> Any:
    @functools.wraps(fn)
    def timed(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            into.append(time.perf_counter() - t0)

    return timed


def run_client(address: str, pushes: int, distinct: int, model: dict[str, int] = FULL_MODEL) -> None:
    """The client process of `--grpc`: join, offer the state, then on "go" push one update after another."""
    from worker.client import CoordinatorClient

    cfg = parse_config(bench_config(pushes + 1, 1, model))
    params = initial_params(cfg)
    updates = [one_update(cfg, params, seed=1 + k) for k in range(distinct)]
    clients = [CoordinatorClient(address) for _ in range(pushes + 1)]
    for c in clients:
        c.join("push-cost")
    clients[0].offer_state(params)
    print("ready", flush=True)
    sys.stdin.readline()
    for i, c in enumerate(clients[1:]):
        c.push(0, updates[i % distinct], {"tokens": 0.0})
    print("done", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pushes", type=int, default=40)
    parser.add_argument("--distinct", type=int, default=8, help="distinct updates (top-k masks) pushed in turn")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the coordinator's decodes share cores)")
    parser.add_argument("--profile", action="store_true", help="print cProfile's top functions, write nothing")
    parser.add_argument("--no-malloc-tuning", action="store_true",
                        help="leave glibc's malloc as it is (CoordinatorServer tunes it: coordinator/malloc.py)")
    parser.add_argument("--grpc", action="store_true", help="push over gRPC (inside deploy/loopback.sh)")
    parser.add_argument("--quick", action="store_true", help="a 0.1M-parameter model (tests)")
    parser.add_argument("--client", help=argparse.SUPPRESS)  # --grpc's client process: the server's address
    parser.add_argument("--out", default="push_cost", help="result name in bench/results")
    args = parser.parse_args(argv)
    if args.pushes < 1 or args.distinct < 1:
        parser.error("--pushes and --distinct must be >= 1")
    if not args.no_malloc_tuning and not args.client:
        tune_malloc()  # as CoordinatorServer does (which also does it itself with --grpc)
    torch.set_num_threads(args.threads)
    model = QUICK_MODEL if args.quick else FULL_MODEL
    if args.client:
        run_client(args.client, args.pushes, args.distinct, model)
        return
    if args.grpc:
        seconds, info = measure_grpc(args.pushes, args.distinct, model)
        phases = ["read_push", "check", "fold", "server_cpu", "wall"]
    else:
        seconds, info = measure(args.pushes, args.distinct, args.profile, model)
        phases = PHASES
    rows = [{"phase": p, "median_ms": 1e3 * statistics.median(seconds[p]),
             "mean_ms": 1e3 * statistics.fmean(seconds[p]), "min_ms": 1e3 * min(seconds[p]),
             "max_ms": 1e3 * max(seconds[p])} for p in phases]
    if args.profile:
        for row in rows:
            print(row)
        return
    write_result(args.out, command_line("bench.push_cost"), rows, COLUMNS,
                 config={"pushes": args.pushes, "distinct": args.distinct, "threads": args.threads, "grpc": args.grpc,
                         "malloc_tuning": not args.no_malloc_tuning,
                         "model": model}, **info)


if __name__ == "__main__":
    main()
