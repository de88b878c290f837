"""CHOCO-Gossip: compressed messages still reach consensus, keep the average, and the per-node state is
exactly the network simulation's."""

from __future__ import annotations

import pytest
import torch

from compression import registry as codecs
from protocols.gossip import (
    ChocoConfig,
    choco_absorb,
    choco_consensus,
    choco_init,
    choco_message,
    choco_models,
    choco_step,
    consensus_distance,
    decode_message,
    gossip_average,
    incoming_weights,
    mixing_matrix,
    network_mean,
)
from protocols.replica import Params

N = 8


def _models(seed: int = 0, dtype: torch.dtype = torch.float32) -> list[Params]:
    g = torch.Generator().manual_seed(seed)
    return [{"v": torch.randn(200, generator=g, dtype=dtype), "m": torch.randn(10, 10, generator=g, dtype=dtype)}
            for _ in range(N)]


CODECS = [("topk", 0.1, 0.2), ("randomk", 0.2, 0.1), ("int8", 1.0, 0.5)]  # (codec, density, gamma)


@pytest.mark.parametrize(("codec", "density", "gamma"), CODECS)
def test_choco_with_a_compressor_reaches_consensus_and_keeps_the_average(
    codec: str, density: float, gamma: float
) -> None:
    w = mixing_matrix("ring", N, scheme="choco")
    compressor = codecs.build(codec, density=density)
    # float64, so that the average is kept to rounding of one step, not of 400 float32 steps (~1e-4).
    models = _models(dtype=torch.float64)
    mean = network_mean(models)
    nodes = [choco_init(m) for m in models]
    start = consensus_distance(models)
    for _ in range(400):
        nodes = choco_step(nodes, w, gamma, compressor)
    final = choco_models(nodes)
    assert consensus_distance(final) < 1e-3 * start  # three orders of magnitude at least
    after = network_mean(final)
    for name in mean:
        torch.testing.assert_close(after[name], mean[name], rtol=0, atol=1e-10)


def test_choco_top_k_sends_a_tenth_of_the_entries() -> None:
    nodes = [choco_init(m) for m in _models()]
    payloads, q = choco_message(nodes[0], ChocoConfig(density=0.1).compressor())
    assert int((q["v"] != 0).sum()) == 20 and int((q["m"] != 0).sum()) == 10
    assert sum(p.nbytes() for p in payloads.values()) < 0.3 * 4 * (200 + 100)


def test_dense_choco_with_gamma_one_is_plain_gossip_one_step_late() -> None:
    # Q = identity: the first step only fills the copies (x_hat = x); each later step is x <- W x.
    w = mixing_matrix("torus", 9, scheme="choco")
    models = [{"x": torch.randn(6, dtype=torch.float64)} for _ in range(9)]
    nodes = [choco_init(m) for m in models]
    plain = models
    dense = codecs.build("none")
    for step in range(5):
        nodes = choco_step(nodes, w, 1.0, dense)
        if step:
            plain = gossip_average(plain, w)
    for got, want in zip(choco_models(nodes), plain, strict=True):
        torch.testing.assert_close(got["x"], want["x"], rtol=0, atol=1e-12)


def test_per_node_state_tracks_the_weighted_copies_of_the_neighbourhood() -> None:
    w = mixing_matrix("ring", N, scheme="choco")
    compressor = codecs.build("topk", density=0.1)
    nodes = [choco_init(m) for m in _models(1)]
    for _ in range(5):
        stepped = [choco_consensus(node, 0.2) for node in nodes]
        sent = [choco_message(node, compressor)[0] for node in stepped]
        nodes = []
        for i, node in enumerate(stepped):
            self_weight, weights = incoming_weights(w, i)
            received = {j: decode_message(sent[j]) for j in weights}  # what arrives over the wire
            nodes.append(choco_absorb(node, decode_message(sent[i]), received, weights, self_weight))
    for i, node in enumerate(nodes):
        expected = sum(float(w[i, j]) * nodes[j].x_hat["v"] for j in range(N))
        torch.testing.assert_close(node.mixed["v"], expected)
    with pytest.raises(ValueError, match="gamma"):
        choco_consensus(nodes[0], 0.0)


def test_too_large_a_consensus_step_diverges_with_top_k() -> None:
    # Why gamma must shrink with the kept fraction: top-10% on a ring of 8 diverges at gamma 0.9.
    w = mixing_matrix("ring", N, scheme="choco")
    compressor = codecs.build("topk", density=0.1)
    models = _models(dtype=torch.float64)
    nodes = [choco_init(m) for m in models]
    for _ in range(400):
        nodes = choco_step(nodes, w, 0.9, compressor)
    assert consensus_distance(choco_models(nodes)) > 10 * consensus_distance(models)
