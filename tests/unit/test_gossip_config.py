"""The `protocol: {kind: gossip}` section: defaults, registration, and errors that name the field."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from protocols import registry
from protocols.config import ConfigError, RunConfig, parse_config
from protocols.gossip import GossipConfig, mixing_matrix
from protocols.gossip import mixing as mx
from protocols.settings import ProtocolSettings
from tests.conftest import tiny_config


def _gossip(workers: int = 4, **protocol: Any) -> RunConfig:
    """tests/conftest.py's tiny run with a gossip section."""
    return parse_config({
        "name": "tiny",
        "model": {"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 32},
        "train": {"steps": 10, "lr": 1e-2, "warmup_steps": 2, "eval_batches": 2, "eval_every_steps": 5},
        "protocol": {"kind": "gossip", **protocol},
        "cluster": {"workers": workers},
    })


def test_defaults_parse_and_the_kind_is_registered_but_not_coordinated() -> None:
    cfg = _gossip(inner_steps=5)
    section = cfg.protocol
    assert isinstance(section, GossipConfig) and ProtocolSettings.registry["gossip"] is GossipConfig
    assert (section.topology, section.scheme, section.gossip_steps) == ("one_peer_exponential", "average", 1)
    assert section.corrects_variance and not section.outer.enabled
    assert cfg.inner_steps == 5 and cfg.rounds == 2
    with pytest.raises(ValueError, match=r"gossip.* does not run through the coordinator"):
        registry.protocol_class("gossip")


def test_nested_sections_parse_and_choco_builds_its_compressor() -> None:
    section = _gossip(
        topology="torus", rows=2, scheme="choco",
        choco={"codec": "int8", "gamma": 0.5},
        outer={"enabled": True, "lr": 1.0, "momentum": 0.5},
        variance_correction={"exclude": ["*.weight"]},
    ).protocol
    assert isinstance(section, GossipConfig)
    assert section.choco.compressor().codec == "int8" and section.outer.momentum == 0.5
    assert section.variance_correction.exclude == ("*.weight",) and not section.corrects_variance
    w = section.mixing_matrix(4, 0)  # 2 x 2 torus: each node has 2 distinct neighbours
    assert mx.is_doubly_stochastic(w) and torch.equal(w, mixing_matrix(section, 4, 0))


@pytest.mark.parametrize(
    ("protocol", "match"),
    [
        ({"scheme": "push_sum", "topology": "ring"}, r"push_sum' is for directed topologies.*use scheme 'average'"),
        ({"scheme": "choco", "topology": "epidemic"}, r"choco' needs a static undirected topology"),
        ({"scheme": "choco", "topology": "ring", "variance_correction": {"enabled": True}},
         r"variance_correction applies to scheme 'average' only"),
        ({"topology": "ring", "degree": 3}, r"protocol\.degree applies to topology 'random_regular' only"),
        ({"topology": "ring", "rows": 2}, r"protocol\.rows applies to topology 'torus' only"),
        ({"topology": "star"}, r"'protocol\.topology'.*'ring', 'torus'"),
        ({"scheme": "gossip"}, r"'protocol\.scheme'.*'average', 'push_sum' or 'choco'"),
        ({"choco": {"gamma": 1.5}}, r"'protocol\.choco\.gamma'.*less than or equal to 1"),
        ({"gossip_steps": 0}, r"'protocol\.gossip_steps'"),
        ({"outer": {"momentum": 1.0}}, r"'protocol\.outer\.momentum'"),
        ({"fanaut": 2}, r"'protocol\.fanaut'.*Extra inputs"),
    ],
)
def test_bad_sections_fail_naming_the_field(protocol: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        _gossip(**protocol)


def test_push_sum_on_a_directed_graph_is_fine_and_corrects_no_variance() -> None:
    section = _gossip(scheme="push_sum", topology="epidemic", fanout=2).protocol
    assert isinstance(section, GossipConfig) and not section.corrects_variance
    assert mx.is_column_stochastic(section.mixing_matrix(8, 3))


@pytest.mark.parametrize(
    ("protocol", "n", "match"),
    [
        ({"topology": "torus"}, 12, r"protocol\.rows: .*perfect square or `rows`"),
        ({"topology": "torus", "rows": 5}, 12, r"protocol\.rows: torus rows \(5\) must divide"),
        ({"topology": "random_regular", "degree": 3}, 7, r"protocol\.degree: .*n \* degree to be even"),
        ({"topology": "random_regular", "degree": 8}, 8, r"protocol\.degree: .*degree < number of nodes"),
        ({"topology": "epidemic", "fanout": 4}, 4, r"protocol\.fanout must be < the number of workers \(4\)"),
    ],
)
def test_what_depends_on_the_worker_count_fails_in_check_nodes(protocol: dict[str, Any], n: int, match: str) -> None:
    section = GossipConfig.model_validate(protocol)
    with pytest.raises(ConfigError, match=match):
        section.check_nodes(n)
    with pytest.raises(ConfigError, match=match):
        section.mixing_matrix(n, 0)


def test_check_nodes_accepts_what_can_run() -> None:
    GossipConfig(topology="torus").check_nodes(16)
    GossipConfig(topology="torus", rows=3).check_nodes(12)
    GossipConfig(topology="random_regular", degree=3).check_nodes(8)
    GossipConfig(topology="epidemic").check_nodes(2)  # default fanout ceil(log2 2) = 1
    GossipConfig().check_nodes(1)


def test_a_topology_that_cannot_fit_the_cluster_fails_when_the_config_is_read() -> None:
    with pytest.raises(ConfigError, match=r"protocol\.degree"):
        tiny_config(protocol={"kind": "gossip", "topology": "random_regular", "degree": 3},
                    cluster={"workers": 5})
