"""Mixing matrices: stochasticity, average preservation, exact consensus of the one-peer exponential
graph, and spectral gaps against their closed forms."""

from __future__ import annotations

import math

import pytest
import torch

from protocols.gossip import (
    consensus_distance,
    gossip_average,
    incoming_weights,
    mix,
    mixing_matrix,
    network_mean,
    outgoing_weights,
    spectral_gap,
)
from protocols.gossip import mixing as mx
from protocols.gossip import topology as topo
from protocols.replica import Params

# (topology, n, keywords): every undirected graph gets Metropolis-Hastings, the exponential graph its
# 1/(tau+1) in-degree weights.
DOUBLY_STOCHASTIC = [
    ("ring", 9, {}),
    ("torus", 16, {}),
    ("torus", 12, {"rows": 3}),
    ("exponential", 16, {}),
    ("exponential", 12, {}),
    ("random_regular", 14, {"degree": 4, "seed": 2}),
    ("full", 6, {}),
]


def _models(n: int, seed: int = 0) -> list[Params]:
    g = torch.Generator().manual_seed(seed)
    return [
        {"w": torch.randn(5, 7, generator=g), "b": torch.randn(7, generator=g, dtype=torch.float64),
         "steps": torch.tensor(i)}
        for i in range(n)
    ]


@pytest.mark.parametrize(("topology", "n", "kw"), DOUBLY_STOCHASTIC, ids=lambda v: str(v))
def test_weights_are_doubly_stochastic_and_a_step_keeps_the_average(topology: str, n: int, kw: dict) -> None:
    w = mixing_matrix(topology, n, **kw)
    assert mx.is_doubly_stochastic(w) and bool((w >= 0).all())
    support = topo.adjacency(topo.neighbours(topology, n, **kw)).T + torch.eye(n, dtype=torch.float64)
    assert torch.equal(w != 0, support != 0)  # weights only where a message actually travels
    models = _models(n)
    mixed = gossip_average(models, w)
    before, after = network_mean(models), network_mean(mixed)
    for name in before:
        torch.testing.assert_close(after[name], before[name], rtol=0, atol=1e-6)
    assert consensus_distance(mixed) < consensus_distance(models)
    assert [m["steps"].item() for m in mixed] == list(range(n))  # integer tensors are kept, not averaged


def test_metropolis_hastings_on_a_ring_is_one_third_and_full_graph_is_exact_average() -> None:
    w = mx.metropolis_hastings(topo.ring(8))
    assert torch.allclose(w[3, [2, 3, 4]], torch.full((3,), 1 / 3, dtype=torch.float64)) and w[3].count_nonzero() == 3
    full = mx.metropolis_hastings(topo.full(5))
    assert torch.allclose(full, torch.full((5, 5), 0.2, dtype=torch.float64))
    assert spectral_gap(full) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="undirected"):
        mx.metropolis_hastings(topo.exponential(8))


@pytest.mark.parametrize("n", [8, 16])
def test_one_peer_exponential_reaches_exact_consensus_in_log2_n_steps(n: int) -> None:
    tau = int(math.log2(n))
    models = [{"x": torch.randn(64, dtype=torch.float64)} for _ in range(n)]
    target = network_mean(models)["x"]
    for step in range(tau):
        w = mixing_matrix("one_peer_exponential", n, step)
        assert sorted(set(w[0].tolist())) == [0.0, 0.5] and mx.is_doubly_stochastic(w)
        if step == tau - 1:
            assert consensus_distance(models) > 1.0  # not there one step early
        models = gossip_average(models, w)
    for m in models:
        torch.testing.assert_close(m["x"], target, rtol=0, atol=1e-12)


def test_directed_weights_are_row_or_column_stochastic_as_their_scheme_needs() -> None:
    w = mixing_matrix("epidemic", 12, 3, fanout=2, seed=1)
    assert mx.is_row_stochastic(w) and not mx.is_column_stochastic(w)  # in-degrees vary
    p = mixing_matrix("epidemic", 12, 3, scheme="push_sum", fanout=2, seed=1)
    assert mx.is_column_stochastic(p) and not mx.is_row_stochastic(p)
    assert torch.allclose(p[:, 0].sum(), torch.tensor(1.0, dtype=torch.float64)) and p[0, 0] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="choco needs an undirected topology"):
        mixing_matrix("exponential", 8, scheme="choco")


@pytest.mark.parametrize("n", [5, 8, 16, 32])
def test_ring_spectral_gap_matches_its_closed_form(n: int) -> None:
    # MH weights 1/3: eigenvalues (1 + 2 cos(2 pi k / n)) / 3; for n >= 5 the largest non-unit one is k = 1.
    expected = 1 - (1 + 2 * math.cos(2 * math.pi / n)) / 3
    assert spectral_gap(mixing_matrix("ring", n)) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("side", [5, 6, 8])
def test_torus_spectral_gap_matches_its_closed_form(side: int) -> None:
    # 4-regular, MH weights 1/5: eigenvalues (1 + 2 cos(2 pi p / side) + 2 cos(2 pi q / side)) / 5; the largest
    # non-unit one is (3 + 2 cos(2 pi / side)) / 5 (and the most negative, -3/5, is smaller in magnitude).
    expected = 1 - (3 + 2 * math.cos(2 * math.pi / side)) / 5
    assert spectral_gap(mixing_matrix("torus", side * side)) == pytest.approx(expected, abs=1e-12)


def test_spectral_gap_orders_the_graphs_by_how_fast_they_mix() -> None:
    n = 16
    gaps = [spectral_gap(mixing_matrix(t, n)) for t in ("ring", "torus", "full")]
    assert gaps == sorted(gaps) and gaps[0] > 0
    # A random 4-regular graph is an expander: far better connected than the ring of the same size.
    assert spectral_gap(mixing_matrix("random_regular", n, degree=4)) > 3 * gaps[0]


def test_per_node_mix_is_the_whole_network_step() -> None:
    n = 9
    w = mixing_matrix("torus", n)
    models = _models(n, seed=1)
    network = gossip_average(models, w)
    for i in range(n):
        self_weight, weights = incoming_weights(w, i)
        assert len(weights) == 4
        got = mix(models[i], {j: models[j] for j in weights}, weights, self_weight)
        for name in got:
            torch.testing.assert_close(got[name], network[i][name])
    keep, shares = outgoing_weights(mixing_matrix("exponential", 8, scheme="push_sum"), 0)
    assert keep == pytest.approx(0.25) and sorted(shares) == [1, 2, 4]


def test_mix_refuses_weights_that_are_not_a_convex_combination_or_do_not_match() -> None:
    a, b = {"x": torch.ones(3)}, {"x": torch.zeros(3)}
    with pytest.raises(ValueError, match=r"sum to 1\.2"):
        mix(a, {1: b}, {1: 0.7}, 0.5)
    with pytest.raises(ValueError, match="weights are for senders"):
        mix(a, {1: b}, {2: 0.5}, 0.5)
    with pytest.raises(ValueError, match="shape"):
        mix(a, {1: {"x": torch.zeros(4)}}, {1: 0.5}, 0.5)
    with pytest.raises(ValueError, match=r"mixing matrix has shape \(2, 2\)"):
        gossip_average([a, b, a], torch.eye(2, dtype=torch.float64))
