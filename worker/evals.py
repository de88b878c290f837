"""Evaluation points for collective runs (DDP, all-gather): rank 0 evaluates, one all-reduce shares it.

Every rank gets the same point (eval loss of the shared model, train loss averaged over ranks), so all
ranks return identical eval lists and any of them can be reported.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from worker.data import Batch
from worker.trainer import InnerTrainer


class EvalLog:
    def __init__(
        self,
        trainer: InnerTrainer,
        eval_batches: Sequence[Batch],
        rank: int,
        world_size: int,
        tokens_per_step: int,
        device: torch.device,
        progress: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.trainer, self.eval_batches = trainer, eval_batches
        self.rank, self.world_size, self.tokens_per_step = rank, world_size, tokens_per_step
        self.device, self.progress = device, progress
        self.points: list[dict[str, Any]] = []
        self.seconds = 0.0  # time spent in evaluation, reported apart from training time

    def record(self, step: int, train_loss: float, bytes_sent: int) -> dict[str, Any]:
        """Collective: every rank must call it at the same step. `train_loss` is this rank's own."""
        began = time.perf_counter()
        # One all-reduce: rank 0's eval loss (the others add 0) and the mean train loss over ranks.
        own_eval = self.trainer.evaluate(self.eval_batches) if self.rank == 0 else 0.0
        losses = torch.tensor([own_eval, train_loss / self.world_size], dtype=torch.float64, device=self.device)
        dist.all_reduce(losses)
        self.seconds += time.perf_counter() - began
        point = {
            "step": step,
            "tokens_total": step * self.tokens_per_step * self.world_size,
            "eval_loss": float(losses[0]),
            "train_loss": float(losses[1]) if step > 0 else None,
            "bytes_sent": bytes_sent,
        }
        self.points.append(point)
        if self.progress is not None:
            self.progress({"rank": self.rank, **point})
        return point
