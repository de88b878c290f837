"""Mixing matrices: how much of each neighbour's model a node takes in one gossip step.

Convention: W is [n, n] float64 and acts on the receiver's row, x'_i = sum_j W[i, j] x_j, so
W[i, j] > 0 only when j sends to i (or j == i). Row sums 1 (row-stochastic) means each x'_i is a convex
combination; column sums 1 (column-stochastic) means no mass is created or lost, so the network sum is
kept; doubly stochastic means both, and then the network average is invariant under every step.

- `metropolis_hastings` (undirected graphs): W[i, j] = 1 / (1 + max(d_i, d_j)) on edges, the rest on the
  diagonal (Xiao & Boyd, "Fast linear iterations for distributed averaging", 2004). Symmetric, hence
  doubly stochastic, from local degrees only. On a ring every weight is 1/3.
- `uniform_incoming` (directed graphs): each node averages its own model and whatever it received with
  equal weights, 1 / (1 + in-degree). Row-stochastic; doubly stochastic when every in-degree equals every
  out-degree, as on the exponential graphs (Ying et al. 2021: weight 1/(tau+1), and 1/2-1/2 for the
  one-peer graph). Epidemic Learning's in-degrees vary, so its plain average drifts: EL accepts that,
  push-sum corrects it.
- `column_stochastic` (push-sum, Kempe et al. 2003): each sender splits its mass equally among itself
  and its out-neighbours, W[j, i] = 1 / (1 + out-degree of i).
"""

from __future__ import annotations

from typing import Protocol

import torch

from protocols.gossip.topology import DIRECTED, Neighbours, in_neighbours, is_undirected, neighbours

TOLERANCE = 1e-9


def metropolis_hastings(out: Neighbours) -> torch.Tensor:
    if not is_undirected(out):
        raise ValueError("Metropolis-Hastings weights need an undirected graph (every edge listed both ways)")
    n = len(out)
    degree = [len(t) for t in out]
    w = torch.zeros(n, n, dtype=torch.float64)
    for i, targets in enumerate(out):
        for j in targets:
            w[i, j] = 1.0 / (1 + max(degree[i], degree[j]))
    w += torch.diag(1.0 - w.sum(dim=1))
    return w


def uniform_incoming(out: Neighbours) -> torch.Tensor:
    n = len(out)
    w = torch.zeros(n, n, dtype=torch.float64)
    for i, sources in enumerate(in_neighbours(out)):
        w[i, [i, *sources]] = 1.0 / (1 + len(sources))
    return w


def column_stochastic(out: Neighbours) -> torch.Tensor:
    n = len(out)
    w = torch.zeros(n, n, dtype=torch.float64)
    for i, targets in enumerate(out):
        w[[i, *targets], i] = 1.0 / (1 + len(targets))
    return w


def is_row_stochastic(w: torch.Tensor, tol: float = TOLERANCE) -> bool:
    return bool((w >= 0).all()) and bool(torch.allclose(w.sum(dim=1), torch.ones(len(w), dtype=w.dtype), atol=tol))


def is_column_stochastic(w: torch.Tensor, tol: float = TOLERANCE) -> bool:
    return is_row_stochastic(w.T, tol)


def is_doubly_stochastic(w: torch.Tensor, tol: float = TOLERANCE) -> bool:
    return is_row_stochastic(w, tol) and is_column_stochastic(w, tol)


def spectral_gap(w: torch.Tensor) -> float:
    """1 - rho, where rho is how fast W mixes.

    Doubly stochastic W: rho = ||W - 11^T/n||_2, the largest *singular value* of W off the consensus
    direction. It is the worst-case one-step contraction of the consensus distance,
    ||W X - X_bar|| <= rho ||X - X_bar||, the quantity gossip convergence bounds use (e.g. Koloskova et
    al., ICML 2019). For symmetric W it equals the second largest eigenvalue magnitude, max(|lambda_2|,
    |lambda_n|); for non-symmetric W eigenvalues alone can promise a contraction that a single step does
    not deliver, singular values cannot.
    Any other W (row- or column-stochastic only): rho = |lambda_2|, the second largest eigenvalue
    magnitude, the asymptotic rate at which W^t approaches its rank-one limit (what push-sum converges at).
    """
    n = len(w)
    if n < 2:
        return 1.0
    w = w.to(torch.float64)
    if is_doubly_stochastic(w, 1e-8):
        rho = torch.linalg.matrix_norm(w - torch.full_like(w, 1.0 / n), ord=2)
        return float(1.0 - rho)
    magnitudes = torch.linalg.eigvals(w).abs().sort(descending=True).values
    return float(1.0 - magnitudes[1])


class GraphSpec(Protocol):
    """What `mixing_matrix` reads from a config (a `GossipConfig` has these fields; read-only here)."""

    @property
    def topology(self) -> str: ...
    @property
    def scheme(self) -> str: ...
    @property
    def degree(self) -> int: ...
    @property
    def fanout(self) -> int | None: ...
    @property
    def rows(self) -> int | None: ...
    @property
    def seed(self) -> int: ...


def mixing_matrix(
    spec: GraphSpec | str,
    n: int,
    step: int = 0,
    *,
    scheme: str = "average",
    degree: int = 4,
    fanout: int | None = None,
    rows: int | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """W for gossip step `step` (round * gossip_steps + q) of `n` nodes.

    spec: a `GossipConfig` (its topology, scheme, degree, fanout, rows and seed are used; the keyword
    arguments are then ignored) or a topology name with the keywords. push_sum gets column-stochastic
    weights; average and choco get Metropolis-Hastings on undirected graphs and `uniform_incoming` on
    directed ones (choco refuses directed graphs: its analysis needs a symmetric W).
    """
    if not isinstance(spec, str):
        topology, scheme, degree, fanout, rows, seed = (
            spec.topology, spec.scheme, spec.degree, spec.fanout, spec.rows, spec.seed
        )
    else:
        topology = spec
    out = neighbours(topology, n, step, degree=degree, fanout=fanout, rows=rows, seed=seed)
    if scheme == "push_sum":
        return column_stochastic(out)
    if scheme not in ("average", "choco"):
        raise ValueError(f"unknown gossip scheme {scheme!r}; known: average, push_sum, choco")
    if topology in DIRECTED:
        if scheme == "choco":
            raise ValueError(f"choco needs an undirected topology (symmetric W), got {topology!r}")
        return uniform_incoming(out)
    return metropolis_hastings(out)


def incoming_weights(w: torch.Tensor, node: int) -> tuple[float, dict[int, float]]:
    """(self weight, {sender: weight}) of row `node`: what `mix` needs on the receiving side."""
    row = w[node]
    return float(row[node]), {j: float(row[j]) for j in range(len(w)) if j != node and row[j] != 0}


def outgoing_weights(w: torch.Tensor, node: int) -> tuple[float, dict[int, float]]:
    """(kept share, {receiver: share}) of column `node`: how a push-sum sender splits its mass."""
    return incoming_weights(w.T, node)
