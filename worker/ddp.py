"""The DDP baseline: every step, all-reduce gradients with torch DistributedDataParallel.

This is the communication-heavy reference the low-bandwidth protocols are measured against. Each rank
trains `cfg.train.steps` steps on its own shard of `cfg.data.split` (iid by default: the whole train
text with the rank's own sampling stream), through the same `InnerTrainer` the DiLoCo workers use, so
the only difference between the contenders is how they communicate.

Bytes are counted with the ring all-reduce model (Patarasuk & Yuan 2009): reducing G gradient bytes
over W ranks costs each rank 2 (W - 1) / W * G bytes sent and the same received per step (a
reduce-scatter plus an all-gather). This is the bandwidth-optimal lower bound that NCCL's ring reaches;
it excludes headers and DDP's bucket padding.

With a `link:` block, each rank's gradient buckets are held, after their all-reduce, for as long as those
ring bytes (plus 2 (N - 1) hops of latency) take on the rank's own emulated link (`LinkConfig.for_worker`),
through a DDP communication hook (worker/link_hook.py); the gradients themselves are unchanged.

Ranks train on `cluster.device` (worker/devices.py); `protocol.backend: auto` all-reduces with NCCL when
that is CUDA (one GPU per rank) and with gloo on CPU.
"""

from __future__ import annotations

import datetime
import functools
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from protocols.config import RunConfig
from protocols.ddp import DDPConfig
from worker.devices import local_ranks_device, resolve_backend, resolve_device
from worker.evals import EvalLog
from worker.link_hook import LinkHook, ring_allreduce_bytes
from worker.session import Session
from worker.spawn import pin_gloo_to_loopback, spawn_on_loopback
from worker.trainer import params_digest
from worker.transports.link import worker_link


def run_ddp_worker(
    rank: int,
    world_size: int,
    init_method: str,
    cfg: RunConfig,
    progress: Callable[[dict[str, Any]], None] | None = None,
    num_threads: int | None = None,
    timeout_s: float = 300.0,
    checkpoint: str | None = None,
) -> dict[str, Any]:
    """Train one DDP rank and return its summary. A collective that waits longer than `timeout_s`
    (a peer died) raises instead of hanging.

    Summary keys: those of `Session.summary` (steps, tokens, bytes_sent / bytes_received / bytes_total by
    ring accounting, see the module docstring, ...) plus rank, world_size, backend, eval_loss (final),
    train_loss (last step, mean over ranks), tokens_total (all ranks), wall_s (training and evals), eval_s,
    gradient_bytes, link_delay_s (seconds the emulated link held this rank's gradient buckets beyond their
    all-reduce; 0 without a `link:` block),
    param_hash (SHA-256 of the final parameters) and evals: a list of {step, tokens_total, eval_loss,
    train_loss, bytes_sent} at step 0 (train_loss None), every `eval_every_steps` and at the end. Rank 0
    evaluates and shares the loss, so every rank reports the same numbers; `progress` gets each point.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside [0, {world_size})")
    device = resolve_device(cfg.cluster.device, rank)
    backend = resolve_backend(_requested_backend(cfg), device)
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    pin_gloo_to_loopback(init_method)
    link_hook: LinkHook | None = None
    dist.init_process_group(
        backend,
        init_method=init_method,
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    try:
        if device.type == "cuda":
            torch.cuda.set_device(device)  # NCCL's communicator and DDP's buckets use the current device
        device_ids = [device.index] if device.type == "cuda" else None
        link = worker_link(cfg, rank)
        if link is not None:
            link_hook = LinkHook(link[0], world_size, seed=link[1])

        def wrap(model: torch.nn.Module) -> torch.nn.Module:
            ddp = DistributedDataParallel(model, device_ids=device_ids)
            if link_hook is not None:
                ddp.register_comm_hook(None, link_hook.hook)
            return ddp

        session = Session.build(cfg, rank, world_size, device, evaluates=rank == 0, wrap=wrap)
        trainer = session.trainer
        gradient_bytes = sum(p.numel() * p.element_size() for p in session.model.parameters() if p.requires_grad)
        per_step = ring_allreduce_bytes(gradient_bytes, world_size)

        log = EvalLog(trainer, session.eval_batches, rank, world_size, session.tokens_per_step, device, progress)
        train_loss = 0.0  # this rank's loss at its latest step

        start = time.perf_counter()
        log.record(0, train_loss, 0)
        for step in range(1, cfg.train.steps + 1):
            train_loss = trainer.step()
            if step % cfg.train.eval_every_steps == 0 or step == cfg.train.steps:
                log.record(step, train_loss, round(step * per_step))
        wall_s = time.perf_counter() - start
        steps = cfg.train.steps
        if checkpoint is not None and rank == 0:
            session.save_checkpoint(checkpoint, trainer.params(), steps, "ddp")
        moved = round(steps * per_step)
        return session.summary(
            moved, moved,
            rank=rank,
            world_size=world_size,
            backend=backend,
            eval_loss=log.points[-1]["eval_loss"],
            train_loss=log.points[-1]["train_loss"],
            tokens_total=steps * session.tokens_per_step * world_size,
            wall_s=wall_s,
            eval_s=log.seconds,
            gradient_bytes=gradient_bytes,
            link_delay_s=link_hook.delayed_s if link_hook is not None else 0.0,
            param_hash=params_digest(trainer.params()),
            evals=log.points,
        )
    finally:
        if link_hook is not None:
            link_hook.close()
        dist.destroy_process_group()


def run_ddp_local(
    cfg: RunConfig, world_size: int, num_threads: int = 1, timeout_s: float = 300.0
) -> list[dict[str, Any]]:
    """Run a DDP job of `world_size` spawned processes on loopback; their summaries, by rank.

    Raises RuntimeError naming the rank (with its traceback) if a process fails or exits without reporting.
    """
    cfg = local_ranks_device(cfg, _requested_backend(cfg), world_size)
    target = functools.partial(run_ddp_worker, cfg=cfg, num_threads=num_threads, timeout_s=timeout_s)
    return spawn_on_loopback(target, world_size, num_threads=num_threads)


def _requested_backend(cfg: RunConfig) -> str:
    return cfg.protocol.backend if isinstance(cfg.protocol, DDPConfig) else "auto"
