"""One simulated client's local training: plain SGD over its own batches from the global model, optionally
DP-SGD through opacus (worker/federated/dp.py).

FedAvg's clients run `local_epochs` of minibatch SGD (McMahan et al., arXiv:1602.05629) and keep no
optimizer state between rounds, so a client's round is a pure function of the global model, its data
and its seed. Tensors a protocol freezes on clients (`frozen_in_training`, e.g. LoRA's A under FedSVD and
FFA-LoRA) get no optimizer step.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from protocols.replica import Params
from worker.trainer import load_trainable, trainable

Batch = tuple[torch.Tensor, torch.Tensor]


def train_client(
    model: nn.Module,
    start: Params,
    batches: Sequence[Batch],
    lr: float,
    frozen: Sequence[str] = (),
    noise_multiplier: float | None = None,
    max_grad_norm: float = 1.0,
    generator: torch.Generator | None = None,
) -> tuple[Params, float]:
    """The client's trainable parameters after SGD over `batches` from `start`, and its mean loss.

    `noise_multiplier` None: plain SGD; else DP-SGD (per-sample clipping to `max_grad_norm`, Gaussian
    noise of `noise_multiplier * max_grad_norm`), the noise drawn from `generator`."""
    load_trainable(model, start)
    params = [p for name, p in trainable(model).items() if not any(f in name for f in frozen)]
    if not params:
        raise ValueError("the client has nothing to train: every exchanged tensor is frozen")
    model.train()
    if noise_multiplier is not None:
        from worker.federated.dp import dp_local_steps

        losses = dp_local_steps(model, lambda: torch.optim.SGD(params, lr=lr), batches, noise_multiplier,
                                max_grad_norm, expected_batch_size=len(batches[0][0]), generator=generator)
    else:
        # Plain SGD written out: building a torch optimizer the first time imports torch._dynamo (about 2 s
        # here), which would land in a simulation's first round.
        losses = []
        for x, y in batches:
            for p in params:
                p.grad = None
            _, loss = model(x, y)
            loss.backward()
            with torch.no_grad():
                for p in params:
                    if p.grad is not None:
                        p.add_(p.grad, alpha=-lr)
            losses.append(float(loss.detach()))
    local = {name: p.detach().clone() for name, p in trainable(model).items()}
    return local, sum(losses) / max(len(losses), 1)
