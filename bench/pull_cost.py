"""One aggregate pull's CPU on the coordinator, over gRPC: what the downlink of bench/coordinator_scale.py costs.

The model and codec of bench/coordinator_scale.py (a 10.75M-parameter GPT, SparseLoCo's paper codec). A
`CoordinatorServer` runs in this process; a client process joins `--workers` members, offers the initial state and
pushes an update from each, 8 distinct ones in turn (as the scale bench's 8 client processes do; more senders
than fit relayed make the downlink send their union), which closes round 0. Then, on "go", it pulls round 0's
aggregate `--pulls` times, one after another, from its members in turn, so nothing else runs meanwhile. Rows:

- `server_cpu`: this process's CPU time (every thread: gRPC's core included) over the pulls, per pull;
- `encode_once`: encoding the aggregate into the messages every pull of the round shares, once per round
  (`serde.EncodedAggregate.of`; not part of `server_cpu`: the first pull's, before the pulls measured);
- `wall`: the pulls' wall time, per pull (the client decodes each aggregate meanwhile).

Beside them, the bytes of the pulls, both ways: `bytes_sent_per_worker`, `bytes_received_per_worker` and
`bytes_total_per_worker` (each member's requests and the aggregates it received, over all its pulls, as the
clients counted them), the same per pull, and `coordinator_counted` (sent, received: what the coordinator counted
for those calls, over all members).

Run it inside deploy/loopback.sh:

    deploy/loopback.sh python -m bench.pull_cost --pulls 40
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import torch

from bench.common import client_process, command_line, go, write_result
from bench.coordinator_scale import FULL_MODEL, QUICK_MODEL, bench_config
from bench.scale_procs import initial_params, one_update
from protocols.config import parse_config
from protocols.wire import serde

COLUMNS = ["phase", "per_pull_ms"]
DISTINCT = 8  # distinct updates, pushed in turn: the scale bench's 8 client processes each push one


def measure(workers: int, pulls: int, model: dict[str, int]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    from coordinator.server import CoordinatorServer

    cfg = parse_config(bench_config(workers, 2, model))
    server = CoordinatorServer(cfg).start()
    quick = ["--quick"] if model == QUICK_MODEL else []
    client = None
    try:
        client = client_process("bench.pull_cost", server.address, "--pulls", str(pulls), "--workers", str(workers),
                                *quick)
        counted0 = _counted(server)
        cpu0, wall0 = time.process_time(), time.perf_counter()
        sent, received = (int(n) for n in go(client).split()[1:])
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        counted = tuple(after - before for after, before in zip(_counted(server), counted0, strict=True))
        aggregate, _ = server.state.aggregates[0]
        messages = sum(1 for _ in server.servicer.aggregates.of(aggregate).stream(""))
        t0 = time.process_time()
        serde.EncodedAggregate.of(aggregate, server.servicer.chunk_bytes)
        encode = time.process_time() - t0
    finally:
        if client is not None:
            client.kill()
            client.wait()
        server.stop()
    rows = [{"phase": "server_cpu", "per_pull_ms": 1e3 * cpu / pulls},
            {"phase": "encode_once", "per_pull_ms": 1e3 * encode},
            {"phase": "wall", "per_pull_ms": 1e3 * wall / pulls}]
    pullers = min(workers, pulls)
    info = {"server_cpu_s": cpu, "wall_s": wall, "messages_per_pull": messages, "pullers": pullers,
            "bytes_sent_per_worker": sent / pullers, "bytes_received_per_worker": received / pullers,
            "bytes_total_per_worker": (sent + received) / pullers, "bytes_sent_per_pull": sent / pulls,
            "bytes_received_per_pull": received / pulls, "bytes_total_per_pull": (sent + received) / pulls,
            "clients_counted": {"sent": sent, "received": received},
            "coordinator_counted": {"sent": counted[0], "received": counted[1]}}
    return rows, info


def _counted(server: Any) -> tuple[int, int]:
    """The bytes the coordinator counted as sent by the members and received by them, over all members."""
    members = server.state.members_copy()
    return sum(member.bytes_sent for member in members), sum(member.bytes_received for member in members)


def run_client(address: str, workers: int, pulls: int, model: dict[str, int]) -> None:
    """The client process: join, offer the state, push one update per member (closing round 0); on "go" pull."""
    import threading

    from worker.client import CoordinatorClient

    cfg = parse_config(bench_config(workers, 2, model))
    params = initial_params(cfg)
    clients = [CoordinatorClient(address) for _ in range(workers)]
    for c in clients:
        c.join("pull-cost")
    clients[0].offer_state(params)
    distinct = [one_update(cfg, params, seed=1 + k) for k in range(min(workers, DISTINCT))]
    updates = [distinct[k % len(distinct)] for k in range(workers)]
    pushes = [threading.Thread(target=c.push, args=(0, u, {"tokens": 0.0}))
              for c, u in zip(clients, updates, strict=True)]
    for t in pushes:
        t.start()
    for t in pushes:
        t.join()
    clients[0].wait_round(0)
    print("ready", flush=True)
    sys.stdin.readline()
    sent, received = sum(c.bytes_sent for c in clients), sum(c.bytes_received for c in clients)
    for i in range(pulls):
        clients[i % workers].pull_aggregate(0, updates[i % workers])
    print("done", sum(c.bytes_sent for c in clients) - sent, sum(c.bytes_received for c in clients) - received,
          flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pulls", type=int, default=40)
    parser.add_argument("--workers", type=int, default=40, help="members pushing into round 0 (8 distinct updates)")
    parser.add_argument("--quick", action="store_true", help="a 0.1M-parameter model (tests)")
    parser.add_argument("--client", help=argparse.SUPPRESS)  # the client process: the server's address
    parser.add_argument("--out", default="pull_cost", help="result name in bench/results")
    args = parser.parse_args(argv)
    if args.pulls < 1 or args.workers < 1:
        parser.error("--pulls and --workers must be >= 1")
    torch.set_num_threads(1)
    model = QUICK_MODEL if args.quick else FULL_MODEL
    if args.client:
        run_client(args.client, args.workers, args.pulls, model)
        return
    rows, info = measure(args.workers, args.pulls, model)
    for row in rows:
        print(row)
    write_result(args.out, command_line("bench.pull_cost"), rows, COLUMNS,
                 config={"pulls": args.pulls, "workers": args.workers, "model": model}, **info)


if __name__ == "__main__":
    main()
