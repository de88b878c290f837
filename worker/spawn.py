"""Run a function in N spawned processes that rendezvous on loopback, and collect their results by rank.

Used by the DDP baseline and the all-gather transport to launch local jobs and tests without Ray.
"""

from __future__ import annotations

import os
import pickle
import queue
import socket
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.multiprocessing as mp


def free_loopback_port() -> int:
    """A port the OS just reported free on 127.0.0.1 (bind to 0, read it back, release it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pin_gloo_to_loopback(init_method: str) -> None:
    """Make gloo open its sockets on `lo` when the rendezvous is on 127.0.0.1.

    Without this gloo binds the address the machine's hostname resolves to, which may not exist inside a
    loopback-only network namespace (CI), where connecting to it then hangs. Call before init_process_group.
    """
    if "127.0.0.1" in init_method or "localhost" in init_method:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")


def _spawned(rank: int, world_size: int, init_method: str, target: Callable[..., Any], args: tuple[Any, ...],
             num_threads: int, results: Any) -> None:  # fmt: skip
    pin_gloo_to_loopback(init_method)
    torch.set_num_threads(num_threads)
    try:
        # Plain pickle, not torch's queue reductions: those pass tensors as shared-memory handles that
        # die with this process, which may exit before the parent reads them.
        results.put((rank, True, pickle.dumps(target(rank, world_size, init_method, *args))))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
        raise


def spawn_on_loopback(
    target: Callable[..., Any], world_size: int, args: tuple[Any, ...] = (), num_threads: int = 1
) -> list[Any]:
    """Run `target(rank, world_size, init_method, *args)` in `world_size` spawned processes; results by rank.

    `init_method` is a fresh `tcp://127.0.0.1:<port>` rendezvous. `target` must be a module-level function
    (it is pickled). A rank that raises makes this raise RuntimeError with that rank's traceback.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    init_method = f"tcp://127.0.0.1:{free_loopback_port()}"
    procs = [
        ctx.Process(target=_spawned, args=(r, world_size, init_method, target, args, num_threads, results))
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    by_rank: dict[int, Any] = {}
    exited_seen = False
    try:
        # Drain the queue before joining: a child blocks on exit until its result is read.
        while len(by_rank) < world_size:
            try:
                rank, ok, value = results.get(timeout=1.0)
            except queue.Empty:
                gone = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode is not None and r not in by_rank]
                # A rank's last words may still be in the pipe when it exits: give them one more wait.
                if gone and exited_seen:
                    raise RuntimeError(f"rank {gone[0][0]} exited with code {gone[0][1]} without a result") from None
                exited_seen = bool(gone)
                continue
            if not ok:
                raise RuntimeError(f"rank {rank} failed:\n{value}")
            by_rank[rank] = pickle.loads(value)
        for p in procs:
            p.join()
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join()
    return [by_rank[r] for r in range(world_size)]
