"""Plain gossip averaging (D-PSGD's communication step): x'_i = sum_j W[i, j] x_j.

Lian et al., "Can Decentralized Algorithms Outperform Centralized Algorithms?", NeurIPS 2017,
arXiv:1705.09056. `gossip_average` does one step for the whole network at once (simulation, tests);
`mix` is the same step as one node computes it from the models it received (the distributed loop).
Both compute in at least float32 and return tensors in each input's dtype. Tensors that are not floating
point (step counters and the like) cannot be averaged: every node keeps its own.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from protocols.replica import Params

# |sum of weights - 1| beyond this means the caller's weights are not a convex combination.
WEIGHT_SUM_TOLERANCE = 1e-6


def check_models(models: Sequence[Mapping[str, torch.Tensor]], what: str = "model") -> None:
    """Every model has the first one's names and shapes (ValueError naming the first difference)."""
    if not models:
        raise ValueError("gossip needs at least one model")
    first = models[0]
    for k, model in enumerate(models[1:], start=1):
        if set(model) != set(first):
            diff = sorted(set(model) ^ set(first))
            raise ValueError(f"{what} {k} and {what} 0 differ in tensor names: {diff}")
        for name, t in model.items():
            if t.shape != first[name].shape:
                raise ValueError(
                    f"{what} {k}'s {name!r} has shape {tuple(t.shape)}, {what} 0's has {tuple(first[name].shape)}"
                )


def work_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def weighted_sum(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """sum_k weights[k] * tensors[k] in at least float32, returned in tensors[0]'s dtype."""
    dtype = work_dtype(tensors[0])
    acc = tensors[0].detach().to(dtype) * weights[0]
    for t, w in zip(tensors[1:], weights[1:], strict=True):
        acc.add_(t.detach().to(device=acc.device, dtype=dtype), alpha=w)
    return acc.to(tensors[0].dtype)


def gossip_average(models: Sequence[Params], w: torch.Tensor) -> list[Params]:
    """One gossip step for all n nodes: node i gets sum_j W[i, j] models[j].

    models: n dicts name -> tensor [any shape], equal names and shapes. w: [n, n] mixing matrix.
    """
    check_models(models)
    n = len(models)
    if tuple(w.shape) != (n, n):
        raise ValueError(f"mixing matrix has shape {tuple(w.shape)}, expected ({n}, {n}) for {n} models")
    out: list[Params] = [{} for _ in range(n)]
    for name, first in models[0].items():
        if not first.dtype.is_floating_point:
            for i in range(n):
                out[i][name] = models[i][name].clone()
            continue
        dtype = work_dtype(first)
        # [n, numel]: one matmul mixes every node's copy of this tensor.
        stacked = torch.stack([m[name].detach().to(dtype).reshape(-1) for m in models])
        mixed = w.to(device=stacked.device, dtype=dtype) @ stacked
        for i in range(n):
            out[i][name] = mixed[i].reshape(first.shape).to(first.dtype)
    return out


def mix(own: Params, received: Mapping[int, Params], weights: Mapping[int, float], self_weight: float) -> Params:
    """Node i's gossip step: self_weight * own + sum_j weights[j] * received[j].

    received: sender -> its model (same names and shapes as own). weights: sender -> W[i, j], exactly the
    senders in `received`. The weights must sum to 1 with self_weight: when a neighbour's message is
    missing, renormalize over those that arrived (the step is then still a convex combination, though no
    longer doubly stochastic across the network).
    """
    if set(received) != set(weights):
        raise ValueError(f"weights are for senders {sorted(weights)} but models came from {sorted(received)}")
    total = self_weight + sum(weights.values())
    if abs(total - 1.0) > WEIGHT_SUM_TOLERANCE:
        raise ValueError(f"mixing weights sum to {total}, not 1: renormalize over the models that arrived")
    senders = sorted(received)
    check_models([own, *(received[j] for j in senders)], what="message")
    coefficients = [self_weight, *(weights[j] for j in senders)]
    out: Params = {}
    for name, mine in own.items():
        if not mine.dtype.is_floating_point:
            out[name] = mine.clone()
            continue
        out[name] = weighted_sum([mine, *(received[j][name] for j in senders)], coefficients)
    return out


def consensus_distance(models: Sequence[Params]) -> float:
    """sqrt(sum_i ||x_i - x_bar||^2) over every floating tensor: 0 exactly at consensus."""
    check_models(models)
    total = 0.0
    for name, first in models[0].items():
        if not first.dtype.is_floating_point:
            continue
        stacked = torch.stack([m[name].detach().to(torch.float64) for m in models])
        total += float(((stacked - stacked.mean(dim=0)) ** 2).sum())
    return total**0.5


def network_mean(models: Sequence[Params]) -> Params:
    """The plain average x_bar over nodes of every floating tensor (in at least float32, returned in each
    tensor's dtype): the quantity a doubly stochastic step keeps."""
    check_models(models)
    n = len(models)
    return {name: weighted_sum([m[name] for m in models], [1.0 / n] * n)
            for name, t in models[0].items() if t.dtype.is_floating_point}
