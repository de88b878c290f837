"""A coordinator protocol (DiLoCo, EControl, ...) trained over torch all-gather instead of the gRPC star.

Each rank trains H inner steps on its own shard, makes its update with the protocol's worker half, and
`worker.collectives.decentralized_round` gives every rank the same new global state: the `torch`
transport of DESIGN.md, for ranks inside one cluster that can open a process group (gloo on CPU, NCCL
on GPU). The model, data shards and inner trainer are those of `worker/ddp.py`, so the DDP baseline and
this path differ only in what they communicate, and the summaries have the same keys.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import os
import pickle
import queue
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from protocols.config import RunConfig
from protocols.registry import build_protocol
from worker.collectives import allgather_bytes, decentralized_round
from worker.data import load_corpus
from worker.ddp import free_loopback_port, resolve_backend
from worker.evals import EvalLog
from worker.model import GPT
from worker.trainer import InnerTrainer, params_digest


@contextlib.contextmanager
def process_group(
    rank: int, world_size: int, init_method: str, backend: str = "gloo", timeout_s: float = 300.0
) -> Iterator[None]:
    """The default process group for the duration of a `with`; a collective stuck past `timeout_s` raises."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside [0, {world_size})")
    timeout = datetime.timedelta(seconds=timeout_s)
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size, timeout=timeout)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _eval_due(round_: int, inner_steps: int, every: int) -> bool:
    """At round 0 and at every round start that crosses an `every`-step boundary (as worker/runtime.py)."""
    return round_ == 0 or (round_ * inner_steps) // every != ((round_ - 1) * inner_steps) // every


def run_allgather_worker(
    rank: int,
    world_size: int,
    init_method: str,
    cfg: RunConfig,
    progress: Callable[[dict[str, Any]], None] | None = None,
    num_threads: int | None = None,
    timeout_s: float = 300.0,
) -> dict[str, Any]:
    """Train one rank of `cfg.protocol` over all-gather and return its summary.

    Summary keys (those of `run_ddp_worker`): rank, world_size, backend, protocol, steps, rounds,
    eval_loss (final), train_loss (last round, mean over ranks), tokens, tokens_total, wall_s, eval_s,
    bytes_sent / bytes_received (ring all-gather accounting, see worker/collectives.py), param_hash and
    evals: {step, tokens_total, eval_loss, train_loss, bytes_sent} at round 0, at round starts crossing
    an `eval_every_steps` boundary, and at the end. Rank 0 evaluates and shares the loss.
    """
    backend = resolve_backend("auto")
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    protocol = build_protocol(cfg)  # fails on kinds with no coordinator half before any process group exists
    with process_group(rank, world_size, init_method, backend, timeout_s):
        device = torch.device("cpu")
        if backend == "nccl":
            device = torch.device("cuda", rank % torch.cuda.device_count())
            torch.cuda.set_device(device)
        corpus = load_corpus(cfg.data.eval_fraction, cfg.data.max_chars)
        torch.manual_seed(cfg.seed)  # every rank builds the same initial model: that is the first global state
        # Training runs on `device`; the protocol's math runs on the CPU copies `trainer.params()` returns.
        model = GPT(cfg.model, corpus.tokenizer.vocab_size).to(device)
        batch, block = cfg.data.batch_size, cfg.model.block_size
        sampler = corpus.shard(rank, world_size, cfg.data.split, cfg.seed).sampler(batch, block)
        trainer = InnerTrainer(model, sampler, cfg.train, cfg.train.steps)
        eval_batches = corpus.eval_batches(batch, block, cfg.train.eval_batches) if rank == 0 else []
        global_ = trainer.params()
        hashes = allgather_bytes(params_digest(global_).encode())
        if len(set(hashes)) != 1:
            raise RuntimeError(f"ranks start from different parameters (hashes {[h.decode() for h in hashes]})")
        server_state = protocol.init_server_state(global_)
        worker_state = protocol.init_worker_state(global_)
        h = getattr(cfg.protocol, "inner_steps", 1)
        log = EvalLog(trainer, eval_batches, rank, world_size, batch * block, device, progress)
        sent, train_loss = 0, 0.0

        start = time.perf_counter()
        for round_ in range(cfg.rounds):
            trainer.load_params(global_)
            if _eval_due(round_, h, cfg.train.eval_every_steps):
                log.record(trainer.step_count, train_loss, sent)
            steps = min(h, cfg.train.steps - round_ * h)
            losses = trainer.train(steps)
            train_loss = sum(losses) / len(losses)
            update, worker_state = protocol.make_update(trainer.params(), global_, worker_state)
            global_, server_state, round_bytes = decentralized_round(protocol, global_, update, server_state)
            sent += round_bytes
        trainer.load_params(global_)
        log.record(trainer.step_count, train_loss, sent)
        wall_s = time.perf_counter() - start
        steps_done = trainer.step_count
        return {
            "rank": rank,
            "world_size": world_size,
            "backend": backend,
            "protocol": cfg.protocol.kind,
            "steps": steps_done,
            "rounds": cfg.rounds,
            "eval_loss": log.points[-1]["eval_loss"],
            "train_loss": log.points[-1]["train_loss"],
            "tokens": steps_done * batch * block,
            "tokens_total": steps_done * batch * block * world_size,
            "wall_s": wall_s,
            "eval_s": log.seconds,
            # The ring sends and receives the same number of blocks of the same (padded) size.
            "bytes_sent": sent,
            "bytes_received": sent,
            "param_hash": params_digest(global_),
            "evals": log.points,
        }


def _spawned(rank: int, world_size: int, init_method: str, target: Callable[..., Any], args: tuple[Any, ...],
             num_threads: int, results: Any) -> None:  # fmt: skip
    if "127.0.0.1" in init_method:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # gloo on loopback, not the resolved hostname
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


def run_allgather_local(
    cfg: RunConfig, world_size: int, num_threads: int = 1, timeout_s: float = 300.0
) -> list[dict[str, Any]]:
    """An all-gather job of `world_size` spawned ranks on loopback; their summaries, by rank."""
    target = functools.partial(run_allgather_worker, cfg=cfg, timeout_s=timeout_s)
    return spawn_on_loopback(target, world_size, num_threads=num_threads)
