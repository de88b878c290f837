"""`cluster.transport: inproc`: the coordinator's state machine and every worker in one process, the
workers as threads sharing torch's thread pool. For tests, quick experiments and the federated simulator.
With `cluster.fold_order: worker` and no dropout a run is reproducible bit for bit.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from coordinator.run import CoordinatorRun
from protocols.config import RunConfig
from worker.faults import Faults
from worker.loop import Progress, WorkerResult
from worker.runners import run_inproc_worker
from worker.session import Session
from worker.transports.inproc import InprocTransport


def run_inproc(
    cfg: RunConfig,
    run_dir: str | Path | None = None,
    progress: Progress | None = None,
    faults: list[Faults] | None = None,
) -> tuple[dict[str, Any], list[WorkerResult]]:
    """Run `cfg` with `cluster.workers` worker threads; (the coordinator's summary, each worker's result).
    A worker that raised makes this raise RuntimeError naming it."""
    run = CoordinatorRun(cfg, run_dir)
    run.start_ticker()
    n = cfg.cluster.workers
    results: list[WorkerResult | None] = [None] * n
    errors: list[str] = []

    # Joined here, in order, so worker i has join index i (its shard, its place in the fold order).
    transports = [InprocTransport(run.state, cfg.cluster.token, f"w{i}") for i in range(n)]
    # Built one by one: each seeds torch's global RNG for its model (threads would interleave the seeding).
    sessions = [Session.build(cfg, t.index, n) for t in transports]

    def work(i: int) -> None:
        try:
            results[i] = run_inproc_worker(transports[i], sessions[i], progress, (faults or [Faults()] * n)[i])
        except BaseException as err:  # reported below, with the worker's name
            errors.append(f"worker w{i}: {type(err).__name__}: {err}")

    threads = [threading.Thread(target=work, args=(i,), name=f"lowband-inproc-w{i}") for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    run.stop_ticker()
    if errors:
        raise RuntimeError("; ".join(errors))
    return run.summary(), [r for r in results if r is not None]
