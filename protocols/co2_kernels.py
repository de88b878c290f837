"""CO2's outer step as pure kernels: the one-round-stale update, its staleness-gap penalty, clipped outer
momentum, and the eager variant's mix of a worker's fresh pseudo-gradient with the others' stale ones.

Sun et al., "CO2: Efficient Distributed Training with Full Communication-Computation Overlap", ICLR 2024,
arXiv:2401.16265: the exchange of round t runs while round t+1's inner steps run, so the outer step at the
end of round t+1 uses round t's average, taken against the outer point theta_s the workers started round t
from, while the replica has since moved on to theta_t. Per tensor:

    gap_t    = ||theta_t - theta_s||_2
    lambda_t = 1 + gap_t / (||avg||_2 + eps)                       (the staleness-gap penalty, >= 1)
    m_t      = clip(beta * m_{t-1} + avg / lambda_t, -phi, phi)    (element-wise)
    theta'   = theta_t - alpha * m_t

Why this penalty: the authors' public code keeps it a constant; the paper motivates it by the gap between
the point the stale update was computed at and the point it is applied to. Measuring that gap in units of
the update's own size makes it scale-free (no learning-rate-dependent constant) and gives exactly 1, i.e.
DiLoCo's heavy-ball outer step, when nothing is stale (theta_t == theta_s); an update applied after the
model already moved by as much as the update itself counts half. The clip bounds every element of the
momentum the step applies (the authors' clamp discarded its result, so it never clipped).

Eager (Kale et al., "Eager Updates For Overlapped Communication and Computation in DiLoCo",
arXiv:2502.12996): worker i replaces its own stale contribution by its fresh one,
avg_i = stale_avg + (fresh_i - stale_i) / n, so with no staleness (fresh_i == stale_i) it is the
synchronous average. Every replica here applies the same (stale) average, so replicas stay identical
and digest-checked; the eager part is how a worker *starts* its next inner steps: from the replica moved
by the outer step's share of the difference, theta - alpha * (fresh_i - stale_i) / n (`eager_start`),
the first-order difference between the eager and the stale outer step. The paper instead lets each
worker's outer state drift apart; ours keeps one shared replica and puts the eager term where it acts.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

Params = dict[str, torch.Tensor]

EPS = 1e-12


def staleness_penalty(current: torch.Tensor, stale_point: torch.Tensor, stale_avg: torch.Tensor) -> float:
    """lambda = 1 + ||current - stale_point|| / (||stale_avg|| + eps) for one tensor (>= 1)."""
    gap = torch.linalg.vector_norm((current - stale_point).to(torch.float64))
    size = torch.linalg.vector_norm(stale_avg.to(torch.float64))
    return float(1.0 + gap / (size + EPS))


def co2_outer_step(
    current: Params,
    stale_point: Params,
    stale_avg: Mapping[str, torch.Tensor],
    momentum: Params,
    lr: float,
    beta: float,
    clip: float | None,
    penalty: bool = True,
) -> tuple[Params, Params, dict[str, float]]:
    """One CO2 outer step; inputs are not modified.

    current:     name -> theta_t [shape], the replica now.
    stale_point: name -> theta_s [shape], the outer point the stale average was computed against.
    stale_avg:   name -> the averaged pseudo-gradient of that round [shape] (a subset of current's names).
    momentum:    name -> m_{t-1} [shape], float32 or wider (missing: zeros).
    clip:        phi > 0, or None for no clipping. penalty False: lambda = 1 (the ablation).
    Returns (theta', m_t, lambda per tensor). Tensors without an average keep value and momentum.
    """
    if lr <= 0 or not 0 <= beta < 1:
        raise ValueError(f"CO2 needs lr > 0 and 0 <= beta < 1, got lr={lr}, beta={beta}")
    if clip is not None and clip <= 0:
        raise ValueError(f"CO2's momentum clip must be > 0 (or None), got {clip}")
    unknown = sorted(set(stale_avg) - set(current))
    if unknown:
        raise ValueError(f"stale averages for tensors that are not parameters: {unknown}")
    new_params: Params = {}
    new_momentum: Params = {n: m for n, m in momentum.items() if n not in stale_avg}
    penalties: dict[str, float] = {}
    for name, theta in current.items():
        avg = stale_avg.get(name)
        if avg is None:
            new_params[name] = theta.clone()
            continue
        if avg.shape != theta.shape or stale_point[name].shape != theta.shape:
            raise ValueError(f"{name!r}: stale average {tuple(avg.shape)} / point do not match {tuple(theta.shape)}")
        work = torch.promote_types(theta.dtype, torch.float32)
        lam = staleness_penalty(theta, stale_point[name], avg) if penalty else 1.0
        prev = momentum.get(name)
        m = avg.to(work) / lam if prev is None else prev.to(work) * beta + avg.to(work) / lam
        if clip is not None:
            m = m.clamp(-clip, clip)  # the result is what is kept and applied
        new_momentum[name] = m
        # torch.add(alpha=-lr) as torch.optim.SGD and protocols.outer do, so zero staleness is DiLoCo bit for bit.
        new_params[name] = torch.add(theta.to(work), m, alpha=-lr).to(theta.dtype)
        penalties[name] = lam
    return new_params, new_momentum, penalties


def eager_average(stale_avg: Params, own_stale: Params, own_fresh: Params, workers: int) -> Params:
    """Worker i's eager update: the stale average with its own stale share replaced by its fresh one."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    return {n: stale_avg[n] + (own_fresh[n] - own_stale[n]) / workers for n in stale_avg}


def eager_start(
    params: Params, own_fresh: Params, own_stale: Params, workers: int, lr: float, proxy: str = "share"
) -> Params:
    """Where worker i starts its next inner steps under eager.

    proxy "share" (Kale et al.): params - lr * (fresh_i - stale_i) / n, the replica as if its last step had
    averaged worker i's fresh pseudo-gradient in place of its stale one.
    proxy "update": params - lr * fresh_i, the replica moved by the outer step of worker i's own fresh update,
    its estimate of the average still in flight. Our choice, beside the paper's: without it, round t+1 trains
    from a replica that lacks round t's average, so its pseudo-gradient measures again the progress that
    average is about to apply, and the two land one after the other (for pseudo-gradients c * (theta - theta*),
    theta' = theta - c * (theta_prev - theta*), which rings with |root| = sqrt(c) instead of converging at
    1 - c). Starting from the worker's own estimate of the in-flight step removes that double count as far
    as the workers agree; under SparseLoCo's per-coordinate averaging over senders a coordinate only worker i
    sent gets exactly its value. Measured in BENCHMARKS.md (CO2 section, Part B table).

    params:    name -> theta [shape], the shared replica (the stale average applied).
    own_fresh: name -> worker i's newest pseudo-gradient [shape]; own_stale: the one the replica's last
               step averaged (missing names count as zero, e.g. before the worker's first update).
    """
    if workers < 1 or lr <= 0:
        raise ValueError(f"eager_start needs workers >= 1 and lr > 0, got workers={workers}, lr={lr}")
    if proxy not in ("share", "update"):
        raise ValueError(f"eager proxy must be 'share' or 'update', got {proxy!r}")
    out = dict(params)
    for name, fresh in own_fresh.items():
        stale = own_stale.get(name)
        work = torch.promote_types(params[name].dtype, torch.float32)
        if proxy == "update":
            out[name] = torch.add(params[name].to(work), fresh.to(work), alpha=-lr).to(params[name].dtype)
            continue
        shift = fresh if stale is None else fresh - stale
        out[name] = torch.add(params[name].to(work), shift.to(work), alpha=-lr / workers).to(params[name].dtype)
    return out
