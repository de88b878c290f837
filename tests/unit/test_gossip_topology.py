"""Gossip graphs: each topology's shape, determinism of the seeded ones, and their errors."""

from __future__ import annotations

import math

import pytest
import torch

from protocols.gossip import topology as topo


def _out_degrees(out: topo.Neighbours) -> list[int]:
    return [len(t) for t in out]


def _check_well_formed(out: topo.Neighbours) -> None:
    for i, targets in enumerate(out):
        assert i not in targets and targets == sorted(set(targets))
        assert all(0 <= j < len(out) for j in targets)


def test_ring_torus_and_full_are_undirected_with_their_degrees() -> None:
    ring = topo.ring(7)
    assert ring[0] == [1, 6] and _out_degrees(ring) == [2] * 7 and topo.is_undirected(ring)
    torus = topo.torus(16)
    # Node 5 is (1, 1) on the 4 x 4 grid: up 1, down 9, left 4, right 6.
    assert torus[5] == [1, 4, 6, 9] and _out_degrees(torus) == [4] * 16 and topo.is_undirected(torus)
    assert topo.torus(12, rows=3)[0] == [1, 3, 4, 8]  # 3 x 4 grid: right 1, left 3, down 4, up 8
    full = topo.full(5)
    assert _out_degrees(full) == [4] * 5 and topo.is_undirected(full)
    for out in (ring, torus, full, topo.ring(2), topo.torus(8, rows=2)):
        _check_well_formed(out)


def test_exponential_graphs_hop_by_powers_of_two() -> None:
    out = topo.exponential(16)
    assert out[3] == [4, 5, 7, 11] and _out_degrees(out) == [4] * 16 and not topo.is_undirected(out)
    assert _out_degrees(topo.exponential(12)) == [4] * 12  # tau = ceil(log2 12) = 4 distinct hops
    for step in range(8):
        hop = 1 << (step % 3)
        assert topo.one_peer_exponential(8, step) == [[(i + hop) % 8] for i in range(8)]


def test_random_regular_is_regular_connected_static_and_seeded() -> None:
    for n, k in ((8, 3), (10, 4), (30, 5), (12, 11)):
        out = topo.random_regular(n, k, seed=1)
        _check_well_formed(out)
        assert _out_degrees(out) == [k] * n and topo.is_undirected(out) and topo.is_connected(out)
    a = topo.neighbours("random_regular", 20, step=0, degree=4, seed=3)
    assert topo.neighbours("random_regular", 20, step=9, degree=4, seed=3) == a  # static: the step is ignored
    assert topo.random_regular(20, 4, seed=4) != a


@pytest.mark.parametrize(("n", "k", "match"), [(6, 6, "degree < number"), (7, 3, "even"), (8, 2, ">= 3")])
def test_random_regular_refuses_impossible_or_disconnected_degrees(n: int, k: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        topo.random_regular(n, k)


def test_epidemic_pushes_to_s_random_others_drawn_from_seed_and_step() -> None:
    n, s = 20, 3
    first = topo.epidemic(n, s, seed=0, step=5)
    _check_well_formed(first)
    assert _out_degrees(first) == [s] * n
    assert topo.epidemic(n, s, seed=0, step=5) == first
    assert topo.epidemic(n, s, seed=0, step=6) != first and topo.epidemic(n, s, seed=1, step=5) != first
    # A node draws its own targets alone, and they are the ones the whole-graph draw gives it.
    assert topo.epidemic_targets(n, s, 0, 5, node=7) == first[7]
    assert topo.neighbours("epidemic", 16, 0) == topo.epidemic(16, 4, 0, 0)  # default s = ceil(log2 16)
    # Uniform: over many steps every other node is picked about equally often by node 0.
    counts = torch.zeros(n)
    for step in range(2000):
        counts[topo.epidemic_targets(n, s, 0, step, node=0)] += 1
    assert counts[0] == 0
    expected = 2000 * s / (n - 1)
    assert torch.all((counts[1:] - expected).abs() < 0.25 * expected)
    with pytest.raises(ValueError, match="fanout"):
        topo.epidemic(5, 5, 0, 0)


def test_adjacency_marks_sender_rows_and_in_neighbours_invert_it() -> None:
    out = [[1], [2], [0, 1]]
    a = topo.adjacency(out)
    assert a.tolist() == [[0, 1, 0], [0, 0, 1], [1, 1, 0]]
    assert topo.in_neighbours(out) == [[2], [0, 2], [1]]


def test_torus_shape_errors_and_unknown_topology() -> None:
    assert topo.torus_shape(16) == (4, 4) and topo.torus_shape(12, 3) == (3, 4)
    with pytest.raises(ValueError, match="perfect square"):
        topo.torus(12)
    with pytest.raises(ValueError, match="must divide"):
        topo.torus(12, rows=5)
    with pytest.raises(ValueError, match="unknown topology 'star'"):
        topo.neighbours("star", 4)
    assert topo.exponent_count(8) == 3 == math.ceil(math.log2(5)) and topo.neighbours("full", 1) == [[]]
