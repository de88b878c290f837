"""One worker's training session, written once: corpus, model, data shard, inner trainer, evaluation,
checkpoint and the summary every runner reports.

The round loop (`worker/loop.py`, every coordinated protocol over any transport) and the DDP baseline
(`worker/ddp.py`) both build a `Session`, so the contenders of a benchmark differ only in how they
communicate.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from protocols.config import RunConfig
from protocols.replica import Params
from worker.data import Batch, Corpus, load_corpus
from worker.devices import resolve_device
from worker.lowrank import base_digest
from worker.models import build_model
from worker.trainer import InnerTrainer


@dataclass
class Session:
    cfg: RunConfig
    index: int  # which shard this worker trains on (0-based)
    workers: int
    corpus: Corpus
    model: nn.Module  # the model of worker/models.py (a DDP wrapper, if any, lives in the trainer)
    trainer: InnerTrainer
    eval_batches: list[Batch]
    device: torch.device
    started: float = field(default_factory=time.monotonic)
    # Elastic membership's deal this session trains on (see `reshard`); (0, 0, 0): the join index's shard.
    deal: tuple[int, int, int] = (0, 0, 0)

    @classmethod
    def build(
        cls,
        cfg: RunConfig,
        index: int,
        workers: int,
        device: torch.device | None = None,
        wrap: Callable[[nn.Module], nn.Module] | None = None,
        evaluates: bool = True,
    ) -> Session:
        """Every worker seeds the same initial model (`cfg.seed`), except under a protocol section with
        `independent_init: true` (gossip): worker `index` then seeds `cfg.seed + index`, so the workers start
        from uncorrelated models. The protocol's `frozen_in_training` tensors (FFA-LoRA's and FedSVD's LoRA A) are
        left out of the inner optimizer. `wrap` (e.g. DistributedDataParallel) wraps the model for training;
        `evaluates` False skips building eval batches on workers that never evaluate. `device` None is
        `cluster.device` resolved on this machine (worker/devices.py); the model is built on CPU from the seed
        and then moved, so every device starts from the same weights."""
        device = device if device is not None else resolve_device(cfg.cluster.device, index)
        corpus = load_corpus(cfg.data.eval_fraction, cfg.data.max_chars).select(cfg.data.plays)
        independent = bool(getattr(cfg.protocol, "independent_init", False))
        torch.manual_seed(cfg.seed + index if independent else cfg.seed)
        model = build_model(cfg, corpus.tokenizer.vocab_size).to(device)
        batch, block = cfg.data.batch_size, cfg.model.block_size
        sampler = corpus.shard(index % workers, workers, cfg.data.split, cfg.seed).sampler(batch, block)
        trainer = InnerTrainer(wrap(model) if wrap else model, sampler, cfg.train, total_steps=cfg.train.steps,
                               lowrank=cfg.lowrank, frozen=cfg.protocol.frozen_in_training)
        evals = corpus.eval_batches(batch, block, cfg.train.eval_batches) if evaluates else []
        return cls(cfg, index, workers, corpus, model, trainer, evals, device)

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.data.batch_size * self.cfg.model.block_size

    def params(self) -> Params:
        """The trainable parameters: what the protocol exchanges (with adapters, the factors only)."""
        return self.trainer.params()

    def base_digest(self) -> str:
        """Digest of the frozen base weights ("" when every weight trains): what a worker attests at join."""
        return base_digest(self.model)

    def evaluate(self) -> float:
        return self.trainer.evaluate(self.eval_batches)

    def eval_due(self, round_: int) -> bool:
        """At round 0 and at every round start that crosses an `eval_every_steps` boundary."""
        h, every = self.cfg.inner_steps, self.cfg.train.eval_every_steps
        return round_ == 0 or (round_ * h) // every != ((round_ - 1) * h) // every

    def steps_in_round(self, round_: int) -> int:
        """Inner steps of round `round_` (the last round may be short)."""
        h = self.cfg.inner_steps
        return max(0, min(h, self.cfg.train.steps - round_ * h))

    def steps_before(self, round_: int) -> int:
        """Inner steps every worker has taken when round `round_` starts (the global step)."""
        return min(round_ * self.cfg.inner_steps, self.cfg.train.steps)

    def continue_from(self, round_: int) -> int:
        """Start training at round `round_` (a late joiner, or a worker process restarted mid-run): the step
        counter, and so the learning-rate schedule, continues from the global step instead of warming up
        again, and this shard's batch stream skips the batches the run's earlier rounds drew from it. The
        inner AdamW moments start afresh (they lived in the lost process). Returns the steps skipped."""
        target = self.steps_before(round_)
        skipped = max(0, target - self.trainer.step_count)
        for _ in range(skipped):
            next(self.trainer.sampler)
        self.trainer.step_count += skipped
        return skipped

    def reshard(self, epoch: int, shard: int, shards: int) -> tuple[str, ...]:
        """Elastic membership (coordinator/deal.py): train on shard `shard` of `shards` from the next step on.
        The batch stream is keyed by this worker's join index and the deal's epoch, so no two workers, and no
        two deals of one worker, draw the same stream. Returns the plays of the new shard."""
        cfg = self.cfg
        part = self.corpus.shard(shard, shards, cfg.data.split, cfg.seed, stream_keys=(self.index, epoch))
        self.trainer.sampler = part.sampler(cfg.data.batch_size, cfg.model.block_size)
        self.deal = (epoch, shard, shards)
        return part.plays

    def save_checkpoint(self, path: str | Path, params: Params, round_: int, run_id: str) -> None:
        """A plain checkpoint (`lowband sample` reads it as it reads the coordinator's)."""
        torch.save({"round": round_, "run_id": run_id, "params": params}, Path(path))

    def summary(self, bytes_sent: int, bytes_received: int, **extra: Any) -> dict[str, Any]:
        """The keys every runner reports (DDP, the round loop over any transport)."""
        steps = self.trainer.step_count
        return {
            "worker_index": self.index,
            "workers": self.workers,
            "protocol": self.cfg.protocol.kind,
            "steps": steps,
            "tokens": steps * self.tokens_per_step,
            "bytes_sent": bytes_sent,
            "bytes_received": bytes_received,
            "bytes_total": bytes_sent + bytes_received,
            "wall_s": time.monotonic() - self.started,
            **extra,
        }
