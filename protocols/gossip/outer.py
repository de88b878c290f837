"""The optional outer step on the gossip average, NoLoCo-style.

Kolehmainen et al., "NoLoCo: No-all-reduce Low Communication Training Method for Large Models",
arXiv:2506.10911, replace DiLoCo's all-reduce by averaging with a few peers and keep an outer Nesterov
step. Here each node treats what gossip moved it by as DiLoCo's pseudo-gradient (Douillard et al.,
arXiv:2311.08105):

    delta_i   = theta_i(start of round) - gossip_average_i      (gossip_average: after the Q steps,
                                                                 variance-corrected when enabled)
    theta_i'  = nesterov_sgd(theta_i(start), delta_i, momentum_i, lr, momentum)

With lr 1 and momentum 0 the node simply takes the gossip average. NoLoCo's own update adds a term pulling
each replica towards its peers' weights; the gossip average already does that, so we keep DiLoCo's outer
step unchanged (protocols/outer.py) rather than a second optimizer. Momentum buffers are per node and
never exchanged.
"""

from __future__ import annotations

from protocols.gossip.average import check_models
from protocols.outer import nesterov_sgd
from protocols.replica import Params


def pseudo_gradient(start: Params, averaged: Params) -> Params:
    """start - averaged for every floating tensor (others have no gradient)."""
    check_models([start, averaged])
    return {name: start[name].detach() - avg.detach().to(start[name].dtype)
            for name, avg in averaged.items() if avg.dtype.is_floating_point}


def gossip_outer_step(
    start: Params,
    averaged: Params,
    momentum_buf: Params,
    lr: float,
    momentum: float,
    nesterov: bool = True,
) -> tuple[Params, Params]:
    """(new parameters, new momentum buffers) of one node; inputs are not modified.

    Tensors that are not floating point (counters) take the averaged dict's value: the node's newest.
    """
    params, buf = nesterov_sgd(start, pseudo_gradient(start, averaged), momentum_buf, lr, momentum, nesterov)
    for name, avg in averaged.items():
        if not avg.dtype.is_floating_point:
            params[name] = avg.clone()
    return params, buf
