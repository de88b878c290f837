"""One gossip step per scheme, as a node computes it from the messages it got, routed here by hand: plain
averaging keeps the network mean, push-sum keeps the mass, CHOCO keeps the sum, and all three bring the
models together; a missing message renormalizes the average over what came."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from protocols.gossip import GossipConfig, consensus_distance, mix, network_mean
from protocols.gossip.push_sum import PushSumState
from protocols.replica import Params
from worker.gossip_nodes import AverageNode, ChocoGossipNode, GossipNode, PushSumNode, make_node
from worker.transports.peers import PeerMessage


def _cfg(**fields: Any) -> GossipConfig:
    return GossipConfig.model_validate({"kind": "gossip", **fields})


def _models(n: int, seed: int = 0) -> list[Params]:
    g = torch.Generator().manual_seed(seed)
    return [{"w": torch.randn(6, 5, generator=g), "b": torch.randn(7, generator=g)} for _ in range(n)]


def step_all(nodes: list[GossipNode], cfg: GossipConfig, step: int, drop: int | None = None) -> None:
    """One gossip step for every node: each node's messages handed to their receivers (those of `drop` lost)."""
    w = cfg.mixing_matrix(len(nodes), step)
    inboxes: dict[int, dict[int, PeerMessage]] = {i: {} for i in range(len(nodes))}
    for node in nodes:
        for to, message in node.outgoing(0, step, w).items():
            assert (message.sender, message.step) == (node.index, step)
            if node.index != drop:
                inboxes[to][node.index] = message
    for node in nodes:
        node.absorb(step, w, inboxes[node.index])


def test_make_node_picks_the_scheme() -> None:
    params = _models(1)[0]
    assert isinstance(make_node(_cfg(topology="ring"), 0, params), AverageNode)
    assert isinstance(make_node(_cfg(topology="exponential", scheme="push_sum"), 0, params), PushSumNode)
    assert isinstance(make_node(_cfg(topology="ring", scheme="choco"), 0, params), ChocoGossipNode)


@pytest.mark.parametrize("topology", ["ring", "one_peer_exponential", "full"])
def test_plain_averaging_keeps_the_network_mean_and_shrinks_the_consensus_distance(topology: str) -> None:
    cfg = _cfg(topology=topology, variance_correction={"enabled": False})
    models = _models(4)
    nodes: list[GossipNode] = [make_node(cfg, i, m) for i, m in enumerate(models)]
    for step in range(3):
        step_all(nodes, cfg, step)
    after = [node.model() for node in nodes]
    for name, mean in network_mean(models).items():
        torch.testing.assert_close(network_mean(after)[name], mean)
    assert consensus_distance(after) < 0.3 * consensus_distance(models)


def test_variance_correction_keeps_each_layers_spread_that_plain_averaging_shrinks() -> None:
    models = _models(8, seed=1)
    spread = sum(float(m["w"].var(correction=0)) for m in models) / len(models)
    for corrects, low, high in ((False, 0.0, 0.6), (True, 0.95, 1.05)):
        cfg = _cfg(topology="ring", variance_correction={"enabled": corrects})
        nodes: list[GossipNode] = [make_node(cfg, i, m) for i, m in enumerate(models)]
        step_all(nodes, cfg, 0)
        ratio = sum(float(n.model()["w"].var(correction=0)) for n in nodes) / len(nodes) / spread
        assert low <= ratio <= high, (corrects, ratio)


def test_a_missing_message_renormalizes_the_weights_over_what_arrived() -> None:
    cfg = _cfg(topology="ring", variance_correction={"enabled": False})
    models = _models(4, seed=2)
    nodes: list[GossipNode] = [make_node(cfg, i, m) for i, m in enumerate(models)]
    step_all(nodes, cfg, 0, drop=3)
    # Node 0 hears 1 and 3 with weight 1/3 each; 3's message is lost: own 1/2, node 1's 1/2.
    expected = mix(models[0], {1: models[1]}, {1: 0.5}, 0.5)
    for name, t in expected.items():
        torch.testing.assert_close(nodes[0].model()[name], t)


@pytest.mark.parametrize("topology", ["one_peer_exponential", "exponential", "epidemic"])
def test_push_sum_keeps_the_mass_and_its_estimates_reach_the_average(topology: str) -> None:
    cfg = _cfg(topology=topology, scheme="push_sum")
    models = _models(8, seed=3)
    nodes = [PushSumNode(i, cfg, m) for i, m in enumerate(models)]
    for step in range(12):
        step_all(list(nodes), cfg, step)
        assert sum(n.state.w for n in nodes) == pytest.approx(8.0)
    mass = [n.state for n in nodes]
    torch.testing.assert_close(sum(s.s["w"] for s in mass), sum(m["w"] for m in models), rtol=1e-5, atol=1e-5)
    mean = network_mean(models)
    for node in nodes:
        torch.testing.assert_close(node.model()["w"], mean["w"], rtol=1e-3, atol=1e-3)
    assert all(isinstance(n.kept, PushSumState) for n in nodes)


def test_push_sum_rebase_keeps_the_weight_and_takes_the_trained_model_as_its_estimate() -> None:
    cfg = _cfg(topology="one_peer_exponential", scheme="push_sum")
    nodes = [PushSumNode(i, cfg, m) for i, m in enumerate(_models(4, seed=4))]
    step_all(list(nodes), cfg, 0)
    trained = _models(1, seed=5)[0]
    weight = nodes[2].state.w
    nodes[2].rebase(trained)
    assert nodes[2].state.w == weight
    torch.testing.assert_close(nodes[2].model()["w"], trained["w"])


def test_choco_keeps_the_sum_and_approaches_consensus_with_compressed_messages() -> None:
    cfg = _cfg(topology="ring", scheme="choco", choco={"codec": "topk", "density": 0.5, "gamma": 0.3})
    models = _models(6, seed=6)
    nodes: list[GossipNode] = [make_node(cfg, i, m) for i, m in enumerate(models)]
    for step in range(60):
        step_all(nodes, cfg, step)
    after = [n.model() for n in nodes]
    torch.testing.assert_close(network_mean(after)["w"], network_mean(models)["w"], rtol=1e-4, atol=1e-4)
    assert consensus_distance(after) < 0.1 * consensus_distance(models)
    # What travels is CHOCO's compressed difference, not the model.
    message = nodes[0].outgoing(0, 60, cfg.mixing_matrix(6, 60))[1]
    assert {p.codec for p in message.payloads.values()} == {"topk"}
