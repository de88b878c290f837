"""The inner (local) training loop: AdamW, warmup + cosine schedule, gradient clipping.

In DiLoCo (Douillard et al., arXiv:2311.08105) each worker keeps its inner AdamW state across rounds and
the learning-rate schedule runs over the worker's whole step budget, not per round; so `InnerTrainer`
keeps `step_count` and the optimizer across `train()` calls, and `load_params` only overwrites the
weights (the coordinator's new global model), never the optimizer state.

AdamW (Loshchilov & Hutter, arXiv:1711.05101) decays only 2-D weights (matmuls and embeddings), not
LayerNorm gains and biases, as in GPT-2/nanoGPT; with `lowrank.method: galore` its moments live in GaLore's
low-rank projection (worker/optimizers.py). Only trainable parameters are optimized and exchanged (with
adapters, the factors: worker/lowrank.py); a protocol's `frozen_in_training` tensors (FFA-LoRA's and
FedSVD's A) are exchanged but skipped by the optimizer. The model may be wrapped in DistributedDataParallel:
training goes through the wrapper (so gradients are all-reduced), evaluation and parameter I/O through
the bare module.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Sequence

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from protocols.config import LowRankConfig, TrainConfig
from worker.optimizers import build_optimizer, frozen_parameters

Batch = tuple[torch.Tensor, torch.Tensor]


def lr_at(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """Learning rate for 0-based `step`: linear warmup reaching `lr` at step warmup_steps - 1, then a
    cosine decay reaching `min_lr_ratio * lr` at the last step (total_steps - 1), flat after."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    floor = cfg.min_lr_ratio * cfg.lr
    span = max(1, total_steps - 1 - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def params_digest(params: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names, shapes, dtypes and bytes: equal digests mean bit-identical parameters."""
    h = hashlib.sha256()
    for name in sorted(params):
        t = params[name].detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def trainable(module: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters a protocol exchanges: every one that requires grad (with adapters, the factors only);
    tied weights appear once."""
    return {name: p for name, p in module.named_parameters() if p.requires_grad}


@torch.no_grad()
def load_trainable(module: nn.Module, params: dict[str, torch.Tensor]) -> None:
    """Copy `params` into `module`'s trainable parameters in place; names and shapes must match exactly (else
    ValueError naming what differs, and nothing is copied)."""
    own = trainable(module)
    missing, unexpected = sorted(own.keys() - params.keys()), sorted(params.keys() - own.keys())
    if missing or unexpected:
        raise ValueError(f"load_params: missing {missing}, unexpected {unexpected}")
    for name, p in own.items():
        if params[name].shape != p.shape:
            raise ValueError(f"load_params: {name} has shape {tuple(params[name].shape)}, model has {tuple(p.shape)}")
    for name, p in own.items():
        p.copy_(params[name])


class InnerTrainer:
    """Runs AdamW steps of `model` on batches drawn from `sampler`; see the module docstring."""

    def __init__(
        self,
        model: nn.Module,
        sampler: Iterator[Batch],
        cfg: TrainConfig,
        total_steps: int,
        num_threads: int | None = None,
        lowrank: LowRankConfig | None = None,
        frozen: Sequence[str] = (),
    ) -> None:
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        if num_threads is not None:
            torch.set_num_threads(num_threads)  # process-wide: only when the caller asks
        self.model = model
        self.module: nn.Module = model.module if isinstance(model, DistributedDataParallel) else model
        self.sampler = sampler
        self.cfg = cfg
        self.total_steps = total_steps
        self.step_count = 0
        self.last_grad_norm = float("nan")  # before clipping, of the most recent step
        self.device = next(self.module.parameters()).device
        self.optimizer = build_optimizer(self.module, cfg, lowrank, lr_at(0, cfg, total_steps), frozen=frozen)
        # Exchanged but never trained here (the protocol's `frozen_in_training`, e.g. LoRA A under FFA-LoRA and
        # FedSVD): autograd still computes their gradient (they keep requires_grad, so `params()` has them);
        # `step` drops it before clipping, so the clip norm is that of what trains.
        self.frozen: list[nn.Parameter] = frozen_parameters(self.module, frozen)

    def current_lr(self) -> float:
        return lr_at(self.step_count, self.cfg, self.total_steps)

    def step(self) -> float:
        """One inner step; returns its training loss. The (clipped) gradients stay in `.grad` until the
        next step, so callers can inspect what the optimizer applied."""
        self.model.train()
        lr = self.current_lr()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        x, y = next(self.sampler)
        self.optimizer.zero_grad(set_to_none=True)
        _, loss = self.model(x.to(self.device), y.to(self.device))
        loss.backward()
        for p in self.frozen:
            p.grad = None
        params = [p for p in self.module.parameters() if p.grad is not None]
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        self.last_grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        self.optimizer.step()
        self.step_count += 1
        return float(loss.detach())

    def train(self, n: int) -> list[float]:
        """`n` inner steps; the losses in order."""
        return [self.step() for _ in range(n)]

    @torch.no_grad()
    def evaluate(self, eval_batches: Sequence[Batch]) -> float:
        """Mean loss over fixed batches, without gradients and in eval mode (restored afterwards)."""
        if not eval_batches:
            raise ValueError("evaluate needs at least one batch")
        was_training = self.module.training
        self.module.eval()
        try:
            losses = [float(self.module(x.to(self.device), y.to(self.device))[1]) for x, y in eval_batches]
        finally:
            self.module.train(was_training)
        return sum(losses) / len(losses)

    def params(self) -> dict[str, torch.Tensor]:
        """The trainable parameters as detached CPU copies (tied weights appear once): every weight, or with
        adapters (worker/lowrank.py) the adapter factors only. What the protocols exchange.

        The device boundary: on a GPU the model trains there, but the replica, the codecs and the wire work on
        CPU tensors, so this is where parameters leave the device (and `load_params` where they return)."""
        return {name: p.detach().cpu().clone() for name, p in trainable(self.module).items()}

    @torch.no_grad()
    def shift_params(self, shift: dict[str, torch.Tensor]) -> None:
        """Add `shift` (CPU tensors, e.g. protocols/arrival.py `outer_shift`) to the trainable parameters in place,
        keeping the inner optimizer's state: the on-arrival merge of an outer step mid-round."""
        own = trainable(self.module)
        if own.keys() != shift.keys():
            raise ValueError(f"shift_params: names differ from the model's: {sorted(own.keys() ^ shift.keys())[:5]}")
        for name, p in own.items():
            if shift[name].shape != p.shape:
                raise ValueError(f"shift_params: {name} has shape {tuple(shift[name].shape)}, "
                                 f"model has {tuple(p.shape)}")
        for name, p in own.items():
            p.add_(shift[name].to(p.device))

    def load_params(self, params: dict[str, torch.Tensor]) -> None:
        """Copy `params` (CPU tensors: the replica) into the trainable parameters in place, onto the model's
        device; names and shapes must match exactly."""
        load_trainable(self.module, params)
