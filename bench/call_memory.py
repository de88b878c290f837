"""What one connection, one open call and one thread cost a process's resident set, by kind (bench/proc_memory.py).

The coordinator's memory above start-up grows with its workers even when the model is tiny
(bench/results/coordinator_scale_quick_kinds.json). Its synchronous gRPC server holds a pool thread per open call,
and those threads run torch when they read a push's payload. This bench takes those parts apart, each measured
alone as the growth of a fresh process over `--count` units:

- `idle-connection`: a server process; a client process opens `--count` channels, makes one small unary call on
  each and keeps them open. What an open connection costs.
- `held-call`: the same, but the calls are all open at once (the handler holds each until every one has
  arrived) on a thread pool with room for all: what a long poll costs a synchronous server, measured once they
  have ended (the pool's threads stay).
- `thread`: `--count` plain Python threads, parked (in a fresh process with torch imported).
- `thread-after-torch`: the same, each having run one small torch op first (torch keeps per-thread state for the
  thread's lifetime).

    python -m bench.call_memory                  # 1,000 of each
    python -m bench.call_memory --count 50 --out call_memory_quick
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent import futures
from typing import Any

import torch

from bench import proc_memory
from bench.common import command_line, write_result

HOLD_LIMIT_S = 60.0  # a held call is let go after this even if not every call arrived (the client failed)
SERVICE, METHOD = "lowband.bench.CallMemory", "Echo"
KINDS = ["thread_stacks", "malloc_arenas", "main_heap", "other_anonymous", "file_backed", "malloc_in_use",
         "malloc_free_kept"]
COLUMNS = ["contender", "count", "rss_kb_per_unit", *[f"{k}_kb_per_unit" for k in KINDS]]
RSS_KINDS = ["thread_stacks", "malloc_arenas", "main_heap", "other_anonymous", "file_backed"]


def per_unit(contender: str, count: int, growth: dict[str, int]) -> dict[str, Any]:
    """A row: the growth of each kind, and of the resident set (the kinds that are resident pages), per unit."""
    row: dict[str, Any] = {"contender": contender, "count": count}
    row["rss_kb_per_unit"] = sum(growth.get(k, 0) for k in RSS_KINDS) / count / 1024
    for kind in KINDS:
        row[f"{kind}_kb_per_unit"] = growth.get(kind, 0) / count / 1024
    row["threads_added"] = growth.get("threads", 0)
    return row


def parked_threads(count: int, work: Callable[[], Any] | None) -> dict[str, int]:
    """Start `count` threads that each run `work` (if any) and park; the growth while they are parked."""
    release = threading.Event()

    def body() -> None:
        if work is not None:
            work()
        release.wait()

    before = proc_memory.breakdown()
    started = [threading.Thread(target=body, daemon=True) for _ in range(count)]
    for thread in started:
        thread.start()
    time.sleep(0.5)  # every thread has run its work and parked
    after = proc_memory.breakdown()
    release.set()
    for thread in started:
        thread.join()
    return proc_memory.growth(before, after)


def _torch_op() -> None:
    torch.empty(16).add_(1.0)


def in_fresh_process(count: int, with_torch: bool) -> dict[str, int]:
    """`parked_threads` in a process of its own: glibc keeps the stacks of ended threads for new ones, so a second
    measurement in one process would find them resident already."""
    out = subprocess.run([sys.executable, "-m", "bench.call_memory", "--role", "threads", "--count", str(count),
                          *(["--torch"] if with_torch else [])], capture_output=True, text=True, check=True)
    return dict(json.loads(out.stdout.splitlines()[-1]))


def serve(pool: int, hold_until: int) -> None:
    """Server role: echo calls (with `hold_until` > 0, each held until that many have arrived, so all are open at
    once); prints its port, then on a line from stdin the growth of its resident set since it started serving,
    as JSON."""
    import grpc

    arrived = threading.Condition()
    calls = [0]

    def echo(request: bytes, context: Any) -> bytes:
        if hold_until > 0:
            with arrived:
                calls[0] += 1
                arrived.notify_all()
                arrived.wait_for(lambda: calls[0] >= hold_until, timeout=HOLD_LIMIT_S)
        return request

    handler = grpc.method_handlers_generic_handler(SERVICE, {METHOD: grpc.unary_unary_rpc_method_handler(echo)})
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=pool), maximum_concurrent_rpcs=pool)
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    before = proc_memory.breakdown()
    print(port, flush=True)
    sys.stdin.readline()
    print(json.dumps(proc_memory.growth(before, proc_memory.breakdown())), flush=True)
    server.stop(0)


def call(port: int, count: int, at_once: bool) -> None:
    """Client role: `count` channels, one call on each (all at once, or one after another), channels kept open
    until stdin closes."""
    import grpc

    channels = [grpc.insecure_channel(f"127.0.0.1:{port}") for _ in range(count)]
    calls = [c.unary_unary(f"/{SERVICE}/{METHOD}") for c in channels]
    if at_once:
        with futures.ThreadPoolExecutor(max_workers=count) as pool:
            list(pool.map(lambda stub: stub(b"x", timeout=60 + HOLD_LIMIT_S), calls))
    else:
        for stub in calls:
            stub(b"x", timeout=60)
    print("done", flush=True)
    sys.stdin.read()


def over_grpc(count: int, held: bool) -> dict[str, int]:
    me = [sys.executable, "-m", "bench.call_memory"]
    pool, hold = (count + 8, count) if held else (8, 0)
    server = subprocess.Popen([*me, "--role", "server", "--pool", str(pool), "--hold", str(hold)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert server.stdin is not None and server.stdout is not None
    client = None
    try:
        port = server.stdout.readline().strip()
        if not port:
            raise RuntimeError("the server process ended before it listened")
        client = subprocess.Popen([*me, "--role", "client", "--port", port, "--count", str(count),
                                   *(["--at-once"] if held else [])], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  text=True)
        assert client.stdout is not None
        if client.stdout.readline().strip() != "done":
            raise RuntimeError("the client process failed its calls")
        server.stdin.write("\n")
        server.stdin.flush()
        return dict(json.loads(server.stdout.readline()))
    finally:
        for proc in (client, server):
            if proc is not None:
                proc.kill()
                proc.wait()


def collect(count: int) -> list[dict[str, Any]]:
    return [per_unit("idle-connection", count, over_grpc(count, held=False)),
            per_unit("held-call", count, over_grpc(count, held=True)),
            per_unit("thread", count, in_fresh_process(count, with_torch=False)),
            per_unit("thread-after-torch", count, in_fresh_process(count, with_torch=True))]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=1000, help="connections, calls or threads per contender")
    parser.add_argument("--out", default="call_memory", help="result name in bench/results")
    parser.add_argument("--role", choices=["bench", "server", "client", "threads"], default="bench",
                        help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--pool", type=int, default=8, help=argparse.SUPPRESS)
    parser.add_argument("--hold", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--at-once", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--torch", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.count < 1:
        parser.error("--count must be at least 1")
    if args.role == "server":
        serve(args.pool, args.hold)
    elif args.role == "client":
        call(args.port, args.count, args.at_once)
    elif args.role == "threads":
        print(json.dumps(parked_threads(args.count, _torch_op if args.torch else None)))
    else:
        write_result(args.out, command_line("bench.call_memory"), collect(args.count), COLUMNS,
                     config={"count": args.count, "held_calls_all_open_at_once": True})


if __name__ == "__main__":
    main()
