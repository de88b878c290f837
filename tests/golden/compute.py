"""Computes one golden trajectory through the round loop over the in-process transport (workers fold in
join order, so the float sums are those of the recording, which folded worker 0 first)."""

from __future__ import annotations

from typing import Any

import torch

from deploy.inproc import run_inproc
from tests.golden.trajectories import WORKERS, case_config


def trajectory(case: str) -> dict[str, Any]:
    """Per round: each worker's mean train loss and the global model's eval loss after the round; the
    final parameters' digest."""
    torch.set_num_threads(1)
    cfg = case_config(case)
    cfg = cfg.model_copy(update={
        "train": cfg.train.model_copy(update={"eval_every_steps": cfg.inner_steps}),
        "cluster": cfg.cluster.model_copy(update={"fold_order": "worker", "transport": "inproc"}),
    })
    train: dict[tuple[int, str], float] = {}

    def progress(event: dict[str, Any]) -> None:
        train[(event["round"], event["worker"])] = event["train_loss"]

    _, results = run_inproc(cfg, progress=progress)
    evals = [point["eval_loss"] for point in results[0].evals]  # round starts, then the final model
    assert len({r.param_hash for r in results}) == 1
    return {
        "train_losses": [[train[(r, f"w{w}")] for w in range(WORKERS)] for r in range(cfg.rounds)],
        "eval_losses": evals[1:],
        "params_hash": results[0].param_hash,
    }
