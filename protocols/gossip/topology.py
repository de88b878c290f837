"""Who talks to whom in gossip step t: out-neighbour lists for n nodes, as pure, seeded functions.

A graph is `Neighbours`: `out[i]` lists the nodes i sends to (sorted, no self, no repeats). Undirected
topologies list every edge both ways. Every function is deterministic in its arguments, so each node
computes the same graph without talking to anyone; randomness comes from `random.Random` seeded with a
string (hashed with SHA-512, not Python's salted `hash`), stable across processes and platforms.

- ring:                 i <-> i +- 1 (mod n).
- torus:                rows x cols grid with wrap-around, i <-> its 4 grid neighbours.
- exponential:          static, directed: i -> i + 2^k (mod n), k = 0..tau-1, tau = ceil(log2 n)
                        (Ying et al., "Exponential Graph is Provably Efficient for Decentralized Deep
                        Training", NeurIPS 2021, arXiv:2110.13363).
- one_peer_exponential: step t: i -> i + 2^(t mod tau) (same paper): one message per node per step; with
                        weights (1/2, 1/2) and n a power of two, tau steps reach exact consensus.
- random_regular:       a random k-regular undirected graph, *static*: drawn once from (seed, n, k) and
                        resampled until connected. Static because CHOCO's x_hat copies and the
                        Metropolis-Hastings weights assume a fixed graph; the per-step random topology is
                        `epidemic`.
- epidemic:             Epidemic Learning (de Vos et al., NeurIPS 2023, arXiv:2310.01972, EL-Local): each
                        step every node pushes to s uniformly random other nodes, drawn from (seed, step,
                        node), so a node can draw its own targets alone; directed, in-degrees vary.
- full:                 everyone to everyone.
"""

from __future__ import annotations

import math
import random
from typing import Literal, get_args

import torch

Neighbours = list[list[int]]
Topology = Literal["ring", "torus", "exponential", "one_peer_exponential", "random_regular", "epidemic", "full"]
TOPOLOGIES: tuple[str, ...] = get_args(Topology)
# Topologies whose edges are one-way: averaging over them needs in-degree weights or push-sum.
DIRECTED = frozenset({"exponential", "one_peer_exponential", "epidemic"})
# Topologies whose graph changes with the step (everything else ignores `step`).
TIME_VARYING = frozenset({"one_peer_exponential", "epidemic"})


def _tidy(out: list[set[int]]) -> Neighbours:
    return [sorted(targets - {i}) for i, targets in enumerate(out)]


def ring(n: int) -> Neighbours:
    return _tidy([{(i - 1) % n, (i + 1) % n} for i in range(n)])


def torus_shape(n: int, rows: int | None = None) -> tuple[int, int]:
    """(rows, cols) of an n-node torus: `rows` given, or the square root when n is a perfect square."""
    if rows is None:
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"a torus of {n} nodes needs n to be a perfect square or `rows` to be given")
        return side, side
    if rows < 1 or n % rows:
        raise ValueError(f"torus rows ({rows}) must divide the number of nodes ({n})")
    return rows, n // rows


def torus(n: int, rows: int | None = None) -> Neighbours:
    r, c = torus_shape(n, rows)
    out: list[set[int]] = []
    for i in range(n):
        a, b = divmod(i, c)
        out.append({((a - 1) % r) * c + b, ((a + 1) % r) * c + b, a * c + (b - 1) % c, a * c + (b + 1) % c})
    return _tidy(out)


def exponent_count(n: int) -> int:
    """tau = ceil(log2 n): the hops 2^0 .. 2^(tau-1) are distinct and nonzero mod n."""
    return max(1, math.ceil(math.log2(n))) if n > 1 else 0


def exponential(n: int) -> Neighbours:
    return _tidy([{(i + (1 << k)) % n for k in range(exponent_count(n))} for i in range(n)])


def one_peer_exponential(n: int, step: int) -> Neighbours:
    if n == 1:
        return [[]]
    hop = 1 << (step % exponent_count(n))
    return _tidy([{(i + hop) % n} for i in range(n)])


def full(n: int) -> Neighbours:
    return _tidy([set(range(n)) for _ in range(n)])


def is_connected(out: Neighbours) -> bool:
    """Whether every node reaches every other along the edges taken both ways (weak connectivity)."""
    n = len(out)
    undirected: list[set[int]] = [set(t) for t in out]
    for i, targets in enumerate(out):
        for j in targets:
            undirected[j].add(i)
    seen, frontier = {0}, [0]
    while frontier:
        node = frontier.pop()
        for j in undirected[node] - seen:
            seen.add(j)
            frontier.append(j)
    return len(seen) == n


def check_random_regular(n: int, degree: int) -> str | None:
    """Why a connected k-regular graph on n nodes cannot be drawn, or None."""
    if degree >= n:
        return f"random_regular needs degree < number of nodes, got degree {degree} for {n} nodes"
    if (n * degree) % 2:
        return f"random_regular needs n * degree to be even, got {n} * {degree}"
    if degree < 3 and degree != n - 1:
        # 1-regular graphs are matchings and 2-regular ones unions of cycles: (almost surely) disconnected.
        return f"random_regular needs degree >= 3 (or n - 1) to be connected, got {degree} for {n} nodes"
    return None


def _suitable(points: list[int], adjacent: list[set[int]], a: int, b: int) -> bool:
    return points[a] != points[b] and points[b] not in adjacent[points[a]]


def _pair_points(n: int, degree: int, rng: random.Random) -> Neighbours | None:
    """One attempt of Steger & Wormald's pairing: join random pairs of free 'points' (each node has
    `degree` of them) that make no loop or double edge; None when the leftovers cannot be paired."""
    points = [i for i in range(n) for _ in range(degree)]
    adjacent: list[set[int]] = [set() for _ in range(n)]
    misses = 0
    while points:
        if len(points) < 64:  # few left: list the suitable pairs, so a dead end is recognised
            pairs = [(a, b) for a in range(len(points)) for b in range(a + 1, len(points))
                     if _suitable(points, adjacent, a, b)]
            if not pairs:
                return None
            a, b = rng.choice(pairs)
        else:  # many left: a random pair is almost always suitable, so sample instead of listing
            a, b = sorted(rng.sample(range(len(points)), 2))
            if not _suitable(points, adjacent, a, b):
                misses += 1
                if misses > 100 * len(points):  # dense leftovers: restart rather than search
                    return None
                continue
        u, v = points[a], points[b]
        adjacent[u].add(v)
        adjacent[v].add(u)
        points.pop(b)  # b > a: pop the later index first so a stays valid
        points.pop(a)
    return [sorted(s) for s in adjacent]


def random_regular(n: int, degree: int, seed: int = 0) -> Neighbours:
    """A connected random `degree`-regular graph (asymptotically uniform: Steger & Wormald 1999)."""
    problem = check_random_regular(n, degree)
    if problem:
        raise ValueError(problem)
    rng = random.Random(f"lowband.gossip.random_regular:{seed}:{n}:{degree}")
    for _ in range(10_000):
        graph = _pair_points(n, degree, rng)
        if graph is not None and is_connected(graph):
            return graph
    raise RuntimeError(f"no connected {degree}-regular graph on {n} nodes found in 10000 draws")


def epidemic_targets(n: int, fanout: int, seed: int, step: int, node: int) -> list[int]:
    """The s nodes `node` pushes to in step `step` (Epidemic Learning, EL-Local), sorted."""
    if not 1 <= fanout < n:
        raise ValueError(f"epidemic fanout must be in [1, n - 1], got {fanout} for {n} nodes")
    rng = random.Random(f"lowband.gossip.epidemic:{seed}:{step}:{node}")
    return sorted(rng.sample([j for j in range(n) if j != node], fanout))


def epidemic(n: int, fanout: int, seed: int, step: int) -> Neighbours:
    return [epidemic_targets(n, fanout, seed, step, i) for i in range(n)] if n > 1 else [[]]


def default_fanout(n: int) -> int:
    """s = ceil(log2 n), at least 1 and at most n - 1: EL's analysis gains a factor s^2 in transient
    iterations, and log2 n pushes per node are what the static exponential graph costs."""
    return min(max(1, exponent_count(n)), max(1, n - 1))


def neighbours(
    topology: str,
    n: int,
    step: int = 0,
    *,
    degree: int = 4,
    fanout: int | None = None,
    rows: int | None = None,
    seed: int = 0,
) -> Neighbours:
    """Out-neighbours of every node in gossip step `step` (round * gossip_steps + q).

    degree: random_regular's k. fanout: epidemic's s (None: `default_fanout(n)`). rows: the torus's
    row count (None: square). seed: random_regular's and epidemic's draws.
    """
    if n < 1:
        raise ValueError(f"gossip needs at least one node, got {n}")
    if step < 0:
        raise ValueError(f"gossip step must be >= 0, got {step}")
    if topology == "ring":
        return ring(n)
    if topology == "torus":
        return torus(n, rows)
    if topology == "exponential":
        return exponential(n)
    if topology == "one_peer_exponential":
        return one_peer_exponential(n, step)
    if topology == "random_regular":
        return random_regular(n, degree, seed) if n > 1 else [[]]
    if topology == "epidemic":
        return epidemic(n, default_fanout(n) if fanout is None else fanout, seed, step)
    if topology == "full":
        return full(n)
    raise ValueError(f"unknown topology {topology!r}; known: {', '.join(TOPOLOGIES)}")


def in_neighbours(out: Neighbours) -> Neighbours:
    """in[i]: the nodes that send to i, sorted."""
    incoming: list[list[int]] = [[] for _ in out]
    for i, targets in enumerate(out):
        for j in targets:
            incoming[j].append(i)
    return [sorted(s) for s in incoming]


def adjacency(out: Neighbours) -> torch.Tensor:
    """A [n, n] float64 0/1 matrix with A[i, j] = 1 iff i sends to j (no self-loops).

    Mixing matrices act on the receiver's row (x'_i = sum_j W[i, j] x_j), so W's support is A^T + I.
    """
    n = len(out)
    a = torch.zeros(n, n, dtype=torch.float64)
    for i, targets in enumerate(out):
        a[i, targets] = 1.0
    return a


def is_undirected(out: Neighbours) -> bool:
    a = adjacency(out)
    return bool(torch.equal(a, a.T))
