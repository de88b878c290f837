"""Push-sum: exact averaging over directed and time-varying graphs.

Kempe, Dobra, Gehrke, "Gossip-Based Computation of Aggregate Information", FOCS 2003; Nedić & Olshevsky,
"Distributed Optimization Over Time-Varying Directed Graphs", IEEE TAC 2015 (arXiv:1303.2289). Each node
holds a sum s_i (initially its model x_i) and a scalar weight w_i (initially 1). Every step it keeps a
share of both and pushes the rest to its out-neighbours, the shares of each sender adding up to 1 (a
column-stochastic W, `mixing.column_stochastic`); a receiver adds up what it kept and what arrived:

    s' = W s,   w' = W w,   estimate z_i = s_i / w_i

Column-stochastic W keeps sum_i s_i and sum_i w_i = n, so mass is never lost; on a strongly connected
graph s_i and w_i both converge to pi_i * (their totals) for the same Perron vector pi, and the ratio
s_i / w_i to the true average, where plain mixing with the same W (x' = W x) converges to n * pi_i * mean,
biased towards nodes many others push to. Stochastic Gradient Push (Assran et al., ICML 2019,
arXiv:1811.10792) trains on z_i: `push_sum_rebase` puts a trained estimate back as s_i = z_i * w_i.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from protocols.gossip.average import WEIGHT_SUM_TOLERANCE, check_models, gossip_average, weighted_sum, work_dtype
from protocols.replica import Params


@dataclass(frozen=True)
class PushSumState:
    """s: name -> the running sum [shape] (floating tensors in at least float32; others carried as they
    are). w: the push-sum weight, > 0."""

    s: Params
    w: float


def push_sum_init(x: Params) -> PushSumState:
    return PushSumState({name: t.detach().to(work_dtype(t)) if t.dtype.is_floating_point else t.clone()
                         for name, t in x.items()}, 1.0)


def push_sum_estimate(state: PushSumState, like: Params | None = None) -> Params:
    """The de-biased model z = s / w (in `like`'s dtypes when given)."""
    out: Params = {}
    for name, s in state.s.items():
        z = s / state.w if s.dtype.is_floating_point else s.clone()
        out[name] = z.to(like[name].dtype) if like is not None else z
    return out


def push_sum_rebase(state: PushSumState, model: Params) -> PushSumState:
    """The state whose estimate is `model`, keeping the weight (after local training on the estimate)."""
    return PushSumState({name: t.detach().to(work_dtype(t)) * state.w if t.dtype.is_floating_point else t.clone()
                         for name, t in model.items()}, state.w)


def _scale(state: PushSumState, share: float) -> PushSumState:
    return PushSumState({n: t * share if t.dtype.is_floating_point else t for n, t in state.s.items()}, state.w * share)


def push_sum_split(
    state: PushSumState, shares: Mapping[int, float], keep: float
) -> tuple[PushSumState, dict[int, PushSumState]]:
    """Sender side: (the part kept, {receiver: the part sent to it}); keep + sum(shares) must be 1
    (`mixing.outgoing_weights` of a column-stochastic W)."""
    total = keep + sum(shares.values())
    if abs(total - 1.0) > WEIGHT_SUM_TOLERANCE or keep <= 0 or any(v < 0 for v in shares.values()):
        raise ValueError(f"push-sum shares must be >= 0, keep > 0, and sum to 1; got keep={keep}, total={total}")
    return _scale(state, keep), {j: _scale(state, share) for j, share in shares.items()}


def push_sum_combine(kept: PushSumState, received: Sequence[PushSumState]) -> PushSumState:
    """Receiver side: the kept part plus every part that arrived."""
    check_models([kept.s, *(r.s for r in received)], what="push-sum state")
    parts = [kept, *received]
    s: Params = {}
    for name, t in kept.s.items():
        s[name] = weighted_sum([p.s[name] for p in parts], [1.0] * len(parts)) if t.dtype.is_floating_point else t
    return PushSumState(s, sum(p.w for p in parts))


def push_sum_step(states: Sequence[PushSumState], w: torch.Tensor) -> list[PushSumState]:
    """One push-sum step for the whole network: s' = W s, w' = W w (W column-stochastic, [n, n])."""
    sums = gossip_average([st.s for st in states], w)
    weights = (w.to(torch.float64) @ torch.tensor([st.w for st in states], dtype=torch.float64)).tolist()
    return [PushSumState(s, float(wt)) for s, wt in zip(sums, weights, strict=True)]
