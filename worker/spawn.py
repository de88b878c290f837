"""Run a function in N fresh processes that rendezvous on loopback, and collect their results by rank.

Used by the DDP baseline and the all-gather transport to launch local jobs and tests without Ray.

The processes are forked from multiprocessing's fork server with torch imported there once, not spawned: a
spawned process imports torch again (measured ad hoc on 2 cores, not kept: 4 ranks started in 4.5 s spawned, in
0.05 s forked once the server was up). The server is a fresh single-threaded interpreter that imported torch and
nothing else, so a rank still starts from a process that ran nothing of the caller's (no gRPC, no threads). What
a spawned rank got from its parent at start, and a forked one would take from the server instead, is passed
along: the environment and the working directory as they are when the job starts. Settings read once when a
process starts (glibc's MALLOC_* and GLIBC_TUNABLES, what torch reads at import) are the server's: as the
caller's environment was when its first job started the server.
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


# Imported once in the fork server, before any rank is forked from it. The caller's main module is imported there
# (as __mp_main__) as a spawned rank imports it, so a target defined in it is found.
PRELOAD = ["__main__", "torch"]


def _spawned(rank: int, world_size: int, init_method: str, target: Callable[..., Any], args: tuple[Any, ...],
             num_threads: int, results: Any, env: dict[str, str], cwd: str) -> None:  # fmt: skip
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
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
    """Run `target(rank, world_size, init_method, *args)` in `world_size` fresh processes; results by rank.

    `init_method` is a fresh `tcp://127.0.0.1:<port>` rendezvous. `target` must be a module-level function
    (it is pickled). A rank that raises makes this raise RuntimeError with that rank's traceback.
    """
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)  # takes effect when the server starts: at this process's first job
    results = ctx.Queue()
    init_method = f"tcp://127.0.0.1:{free_loopback_port()}"
    started_with = (dict(os.environ), os.getcwd())
    procs = [
        ctx.Process(target=_spawned,
                    args=(r, world_size, init_method, target, args, num_threads, results, *started_with))
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
