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
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist

from protocols.config import RunConfig
from protocols.registry import build_protocol
from worker.collectives import allgather_bytes, decentralized_round
from worker.data import load_corpus
from worker.ddp import resolve_backend
from worker.evals import EvalLog
from worker.model import GPT
from worker.spawn import pin_gloo_to_loopback, spawn_on_loopback
from worker.trainer import InnerTrainer, params_digest


@contextlib.contextmanager
def process_group(
    rank: int, world_size: int, init_method: str, backend: str = "gloo", timeout_s: float = 300.0
) -> Iterator[None]:
    """The default process group for the duration of a `with`; a collective stuck past `timeout_s` raises."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside [0, {world_size})")
    timeout = datetime.timedelta(seconds=timeout_s)
    pin_gloo_to_loopback(init_method)
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


def run_allgather_local(
    cfg: RunConfig, world_size: int, num_threads: int = 1, timeout_s: float = 300.0
) -> list[dict[str, Any]]:
    """An all-gather job of `world_size` spawned ranks on loopback; their summaries, by rank."""
    target = functools.partial(run_allgather_worker, cfg=cfg, timeout_s=timeout_s)
    return spawn_on_loopback(target, world_size, num_threads=num_threads)
