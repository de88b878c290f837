"""Push-sum de-biases averaging over directed graphs, where plain mixing does not."""

from __future__ import annotations

import pytest
import torch

from protocols.gossip import (
    PushSumState,
    gossip_average,
    mixing_matrix,
    network_mean,
    outgoing_weights,
    push_sum_combine,
    push_sum_estimate,
    push_sum_init,
    push_sum_rebase,
    push_sum_split,
    push_sum_step,
)
from protocols.gossip import mixing as mx
from protocols.replica import Params

# A directed ring 0 -> 1 -> ... -> 5 -> 0 with one chord 0 -> 2: node 0 splits its mass three ways,
# the others two ways, so the column-stochastic weights are not row-stochastic.
DIRECTED_RING = [[1, 2], [2], [3], [4], [5], [0]]


def _models(n: int) -> list[Params]:
    g = torch.Generator().manual_seed(0)
    return [{"x": torch.randn(32, generator=g, dtype=torch.float64) + 5.0} for _ in range(n)]


def _max_error(models: list[Params], target: torch.Tensor) -> float:
    return max(float((m["x"] - target).abs().max()) for m in models)


def test_push_sum_converges_to_the_average_where_plain_mixing_is_biased() -> None:
    w = mx.column_stochastic(DIRECTED_RING)
    assert mx.is_column_stochastic(w) and not mx.is_row_stochastic(w)
    models = _models(len(DIRECTED_RING))
    target = network_mean(models)["x"]
    states = [push_sum_init(m) for m in models]
    plain = models
    for _ in range(300):
        states = push_sum_step(states, w)
        plain = gossip_average(plain, w)
    assert sum(s.w for s in states) == pytest.approx(len(models))  # mass is neither created nor lost
    assert _max_error([push_sum_estimate(s) for s in states], target) < 1e-9
    # Plain mixing with the same weights settles at n * pi_i * mean (pi: the Perron vector), not the mean.
    assert _max_error(plain, target) > 0.5
    consensus = torch.stack([m["x"] for m in plain])
    assert float((consensus[0] - consensus[3]).abs().max()) > 0.5


def test_push_sum_averages_over_epidemic_time_varying_graphs() -> None:
    n = 10
    models = _models(n)
    target = network_mean(models)["x"]
    states = [push_sum_init(m) for m in models]
    for step in range(60):
        states = push_sum_step(states, mixing_matrix("epidemic", n, step, scheme="push_sum", fanout=2, seed=7))
    assert _max_error([push_sum_estimate(s) for s in states], target) < 1e-9


def test_per_node_split_and_combine_is_the_network_step() -> None:
    w = mx.column_stochastic(DIRECTED_RING)
    n = len(DIRECTED_RING)
    states = push_sum_step([push_sum_init(m) for m in _models(n)], w)  # unequal weights from here on
    expected = push_sum_step(states, w)
    kept: list[PushSumState] = []
    inbox: list[list[PushSumState]] = [[] for _ in range(n)]
    for i, state in enumerate(states):
        keep, shares = outgoing_weights(w, i)
        mine, sent = push_sum_split(state, shares, keep)
        kept.append(mine)
        for j, part in sent.items():
            inbox[j].append(part)
    for i in range(n):
        got = push_sum_combine(kept[i], inbox[i])
        assert got.w == pytest.approx(expected[i].w, abs=1e-12)
        torch.testing.assert_close(got.s["x"], expected[i].s["x"])
    with pytest.raises(ValueError, match="sum to 1"):
        push_sum_split(states[0], {1: 0.6}, 0.6)


def test_rebase_keeps_the_weight_and_makes_the_estimate_the_trained_model() -> None:
    state = PushSumState({"x": torch.full((3,), 2.0)}, 0.25)
    trained = {"x": torch.tensor([1.0, -1.0, 3.0], dtype=torch.float16)}
    rebased = push_sum_rebase(state, trained)
    assert rebased.w == 0.25
    est = push_sum_estimate(rebased, like=trained)
    assert est["x"].dtype == torch.float16 and torch.equal(est["x"], trained["x"])
    assert torch.equal(push_sum_estimate(state)["x"], torch.full((3,), 8.0))
