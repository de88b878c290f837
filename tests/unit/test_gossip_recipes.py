"""The shipped gossip recipes resolve by name and say what their comments say; `lowband run` refuses
gossip over a transport it cannot run yet, before Ray starts."""

from __future__ import annotations

from pathlib import Path

import pytest
import ray
import yaml

from deploy.cli import recipe_path
from deploy.launcher import LaunchError, run
from protocols.config import RunConfig, load_config, parse_config, to_yaml
from protocols.gossip import GossipConfig


@pytest.mark.parametrize(("name", "topology"), [("gossip", "ring"), ("gossip-exponential", "one_peer_exponential")])
def test_the_gossip_recipes_resolve_by_name_and_run_in_process(name: str, topology: str) -> None:
    cfg = load_config(recipe_path(name))
    assert isinstance(cfg.protocol, GossipConfig) and cfg.name == name
    assert (cfg.protocol.topology, cfg.cluster.workers, cfg.cluster.transport) == (topology, 4, "inproc")
    assert cfg.protocol.independent_init and cfg.protocol.corrects_variance
    # config.yaml (and the rendezvous' copy for p2p workers) names every field: it must parse back whole.
    assert parse_config(yaml.safe_load(to_yaml(cfg))) == cfg


def test_gossip_over_p2p_is_refused_by_lowband_run_before_anything_starts(tmp_path: Path) -> None:
    cfg = load_config(recipe_path("gossip"), [f"run_dir={tmp_path}", "cluster.transport=p2p"])
    assert isinstance(cfg, RunConfig)
    with pytest.raises(LaunchError, match=r"gossip in process only.*cluster.transport 'p2p' start `lowband coord"):
        run(cfg)
    assert not ray.is_initialized()
