"""Run configuration: defaults, YAML recipes, dotted overrides, errors that name the field, and the
protocol union assembled from every registered `ProtocolSettings` subclass."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

import protocols
from compression import registry as codec_registry
from protocols import registry
from protocols.base import Protocol
from protocols.compressed import Compression
from protocols.config import (
    CompressionConfig,
    ConfigError,
    RunConfig,
    apply_overrides,
    load_config,
    parse_config,
    to_yaml,
    with_cluster,
)
from protocols.ddp import DDPConfig
from protocols.diloco import DiLoCo, DiLoCoConfig
from protocols.downlink import Downlink
from protocols.econtrol import EControl, EControlCompression, EControlConfig
from protocols.registry import build_protocol
from protocols.settings import DownlinkConfig, ProtocolSettings
from protocols.sparseloco import SparseLoCoConfig


def _recipe(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_defaults_are_valid_and_are_diloco_with_the_paper_outer_optimizer() -> None:
    cfg = load_config()
    assert cfg == RunConfig()
    assert isinstance(cfg.protocol, DiLoCoConfig)
    assert (cfg.protocol.outer_lr, cfg.protocol.outer_momentum, cfg.protocol.nesterov) == (0.7, 0.9, True)
    assert cfg.cluster.quorum == cfg.cluster.workers
    assert (cfg.cluster.transport, cfg.cluster.fold_order) == ("grpc", "arrival")
    assert cfg.protocol.downlink == DownlinkConfig() and cfg.protocol.downlink.codec == "auto"


def test_yaml_recipe_loads_and_protocol_kind_defaults_to_diloco(tmp_path: Path) -> None:
    path = _recipe(
        tmp_path,
        "name: tiny\nprotocol:\n  inner_steps: 25\ntrain:\n  steps: 60\ncluster:\n  workers: 3\n  min_workers: 2\n",
    )
    cfg = load_config(path)
    assert cfg.name == "tiny"
    assert isinstance(cfg.protocol, DiLoCoConfig) and cfg.protocol.inner_steps == 25
    assert cfg.cluster.quorum == 2
    assert cfg.rounds == 3 and cfg.inner_steps == 25  # ceil(60 / 25): the last round is short


def test_ddp_recipe_selects_the_ddp_branch(tmp_path: Path) -> None:
    cfg = load_config(_recipe(tmp_path, "protocol:\n  kind: ddp\n  backend: gloo\n"))
    assert cfg.protocol == DDPConfig(backend="gloo")
    assert cfg.inner_steps == 1 and cfg.rounds == cfg.train.steps  # no inner loop: one "round" per step


def test_sparseloco_and_econtrol_parse_with_their_papers_compression_defaults() -> None:
    sparse = parse_config({"protocol": {"kind": "sparseloco", "compression": {"density": 0.03}}})
    assert isinstance(sparse.protocol, SparseLoCoConfig)
    comp = sparse.protocol.compression
    # Overriding one field keeps the paper's others (codec, EF14 with decay 0.95).
    assert (comp.codec, comp.density, comp.error_feedback, comp.decay) == ("sparseloco", 0.03, "ef14", 0.95)
    assert sparse.rounds == -(-sparse.train.steps // 15)
    econtrol = parse_config({"protocol": {"kind": "econtrol", "compression": {"codec": "int8", "eta": 0.05}}})
    assert isinstance(econtrol.protocol, EControlConfig)
    ecomp = econtrol.protocol.compression
    assert (ecomp.codec, ecomp.error_feedback, ecomp.eta) == ("int8", "econtrol", 0.05)
    assert econtrol.rounds == econtrol.train.steps  # inner_steps 1: one round per step
    assert DiLoCoConfig().compression == CompressionConfig()  # DiLoCo's paper sends dense tensors


def test_econtrol_eta_left_unset_is_the_codecs_contraction() -> None:
    assert EControlCompression().eta is None  # derived when the protocol is built
    for density in (0.1, 0.25):
        cfg = parse_config({"protocol": {"kind": "econtrol", "compression": {"density": density}}})
        protocol = build_protocol(cfg)
        assert isinstance(protocol, EControl) and protocol.compression.eta == density  # top-k's delta
    # Outside EControl an unset eta means nothing and stays 1.
    assert Compression.from_config(CompressionConfig(codec="topk", error_feedback="ef14")).eta == 1.0


def test_econtrol_on_a_quantizer_needs_an_explicit_eta() -> None:
    # int8 has no closed-form contraction delta to derive eta from.
    section = EControlConfig(compression=EControlCompression(codec="int8"))
    with pytest.raises(ValueError, match=r"protocol\.compression\.eta"):
        EControl.from_settings(section)
    with pytest.raises(ValueError, match=r"protocol\.compression\.eta"):
        load_config(None, ["protocol.kind=econtrol", "protocol.compression.codec=int8"])
    # The same holds for an EControl downlink on a quantizer.
    with pytest.raises(ValueError, match=r"downlink\.eta"):
        Downlink.from_config(DownlinkConfig(codec="int8", error_feedback="econtrol"), DiLoCo())


@pytest.mark.parametrize("transport", ["grpc", "allgather", "inproc"])
def test_cluster_transport_accepts_the_three_transports(transport: str) -> None:
    assert load_config(None, [f"cluster.transport={transport}"]).cluster.transport == transport


def test_cluster_transport_rejects_others_naming_the_field_and_the_choices() -> None:
    with pytest.raises(ConfigError, match=r"'cluster\.transport'.*'grpc', 'allgather', 'inproc' or 'p2p'"):
        load_config(None, ["cluster.transport=udp"])


def test_a_gossip_config_that_names_no_transport_runs_over_p2p_and_keeps_it_through_yaml() -> None:
    cfg = load_config(None, ["protocol.kind=gossip"])
    assert cfg.cluster.transport == "p2p"
    assert load_config(None, ["protocol.kind=gossip", "cluster.transport=inproc"]).cluster.transport == "inproc"
    # The rendezvous sends the config to p2p workers as YAML: it must come back whole.
    assert parse_config(yaml.safe_load(to_yaml(cfg))) == cfg


@pytest.mark.parametrize("transport", ["grpc", "allgather"])
def test_gossip_refuses_the_transports_that_need_an_aggregator(transport: str) -> None:
    with pytest.raises(ConfigError, match=rf"cluster\.transport '{transport}' needs an aggregator, and protocol "
                                          r"'gossip' has none: use 'p2p' .* or 'inproc'"):
        load_config(None, ["protocol.kind=gossip", f"cluster.transport={transport}"])


@pytest.mark.parametrize("kind", ["diloco", "sparseloco", "ddp"])
def test_p2p_carries_gossip_only(kind: str) -> None:
    with pytest.raises(ConfigError, match=rf"cluster\.transport 'p2p' carries gossip only .*; protocol '{kind}' "
                                          r"runs over 'grpc', 'allgather' or 'inproc'"):
        load_config(None, [f"protocol.kind={kind}", "cluster.transport=p2p"])


# Every codec the registry knows (the config spells the lossless one "none", not "dense"), "auto" and "sparse".
DOWNLINK_CODECS = [*sorted(set(codec_registry.known_codecs()) - {"dense"}), "auto", "sparse"]


@pytest.mark.parametrize("codec", DOWNLINK_CODECS)
def test_downlink_codec_accepts_auto_sparse_and_any_codec(codec: str) -> None:
    cfg = load_config(None, ["protocol.kind=sparseloco", f"protocol.downlink.codec={codec}"])
    assert isinstance(cfg.protocol, SparseLoCoConfig) and cfg.protocol.downlink.codec == codec
    protocol = build_protocol(cfg)
    expected = {"auto": "sparse", "sparse": "sparse", "none": "dense"}.get(codec, "codec")
    assert Downlink.from_config(cfg.protocol.downlink, protocol).mode == expected


def test_sparse_downlink_is_refused_for_econtrol_which_keeps_shifts() -> None:
    section = EControlConfig(downlink=DownlinkConfig(codec="sparse"))
    with pytest.raises(ValueError, match=r"downlink\.codec 'sparse'.*keeps per-worker shifts"):
        Downlink.from_config(section.downlink, EControl.from_settings(section))
    with pytest.raises(ConfigError, match=r"downlink\.codec 'sparse'"):  # and before anything starts
        parse_config({"protocol": {"kind": "econtrol", "downlink": {"codec": "sparse"}}})


def test_dotted_overrides_parse_values_as_yaml_and_win_over_the_recipe(tmp_path: Path) -> None:
    path = _recipe(tmp_path, "protocol:\n  inner_steps: 10\n")
    cfg = load_config(path, ["protocol.inner_steps=30", "protocol.nesterov=false", "model.dropout=0.1"])
    assert isinstance(cfg.protocol, DiLoCoConfig)
    assert cfg.protocol.inner_steps == 30 and cfg.protocol.nesterov is False
    assert cfg.model.dropout == 0.1


def test_overrides_do_not_modify_the_input_dict() -> None:
    data = {"protocol": {"inner_steps": 10}}
    out = apply_overrides(data, ["protocol.inner_steps=20"])
    assert data == {"protocol": {"inner_steps": 10}} and out["protocol"]["inner_steps"] == 20


def test_to_yaml_round_trips(tmp_path: Path) -> None:
    cfg = load_config(None, ["protocol.inner_steps=7", "cluster.min_workers=2", "seed=3", "cluster.transport=inproc"])
    assert load_config(_recipe(tmp_path, to_yaml(cfg))) == cfg


@pytest.mark.parametrize(
    ("data", "field", "detail"),
    [
        ({"protocol": {"kind": "gossipy"}}, "'protocol'", "'ddp', 'diloco', 'econtrol'"),
        ({"protocol": {"inner_steps": -5}}, "inner_steps", "greater than 0"),
        ({"protocol": {"inner_steps": 0}}, "inner_steps", "greater than 0"),
        ({"modle": {"n_layer": 2}}, "'modle'", "Extra inputs"),
        ({"protocol": {"kind": "ddp", "inner_steps": 5}}, "inner_steps", "Extra inputs"),
        ({"model": {"n_layer": None}}, "model.n_layer", "valid integer"),
        ({"cluster": {"workers": 2, "min_workers": 3}}, "'cluster'", "min_workers (3) cannot exceed workers (2)"),
        ({"cluster": {"fold_order": "random"}}, "cluster.fold_order", "'arrival' or 'worker'"),
        ({"model": {"n_embd": 130, "n_head": 4}}, "'model'", "n_embd (130) must be a multiple of n_head (4)"),
        ({"protocol": {"compression": {"codec": "zip"}}}, "compression.codec", "'int8'"),
        (
            {"protocol": {"kind": "sparseloco", "compression": {"density": -0.1}}},
            "compression.density",
            "greater than 0",
        ),
        ({"protocol": {"kind": "econtrol", "compression": {"codec": "zip"}}}, "compression.codec", "'sparseloco'"),
        ({"protocol": {"kind": "econtrol", "compression": {"eta": 0}}}, "compression.eta", "greater than 0"),
        ({"protocol": {"kind": "econtrol", "compression": {"eta": -1.0}}}, "compression.eta", "greater than 0"),
        (
            {"protocol": {"kind": "sparseloco", "compression": {"decay": 1.5}}},
            "compression.decay",
            "less than or equal",
        ),
        ({"protocol": {"kind": "sparseloco", "compression": {"error_feedback": "ef21"}}}, "error_feedback", "'ef14'"),
        ({"protocol": {"kind": "econtrol", "outer_momentum": 1.0}}, "protocol.outer_momentum", "less than 1"),
        ({"protocol": {"downlink": {"codec": "zip"}}}, "protocol.downlink.codec", "'auto' or 'sparse'"),
        ({"protocol": {"kind": "ddp", "downlink": {"codec": "int8"}}}, "protocol.downlink", "Extra inputs"),
    ],
)
def test_invalid_config_names_the_field(data: dict[str, object], field: str, detail: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(data)
    assert field in str(err.value)
    assert detail in str(err.value)


def test_empty_field_in_a_recipe_is_reported_by_name(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"'train\.steps'"):
        load_config(_recipe(tmp_path, "train:\n  steps:\n"))


@pytest.mark.parametrize("override", ["protocol.inner_steps", "=30", " =1"])
def test_bad_override_syntax(override: str) -> None:
    with pytest.raises(ConfigError, match=r"not of the form key\.sub=value"):
        load_config(None, [override])


def test_override_through_a_scalar_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="'name' is not a section"):
        load_config(_recipe(tmp_path, "name: tiny\n"), ["name.x=1"])


def test_nonexistent_recipe(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n"])
def test_recipe_must_be_a_mapping(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(_recipe(tmp_path, text))


def test_recipe_with_broken_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(_recipe(tmp_path, "protocol: [unclosed\n"))


def test_registry_builds_diloco_from_the_config_and_refuses_ddp() -> None:
    protocol = build_protocol(load_config(None, ["protocol.outer_lr=0.5", "protocol.outer_momentum=0.8"]))
    assert isinstance(protocol, DiLoCo) and protocol.kind == "diloco"
    assert (protocol.outer_lr, protocol.outer_momentum) == (0.5, 0.8)
    with pytest.raises(ValueError, match=r"ddp.* does not run through the coordinator"):
        build_protocol(load_config(None, ["protocol.kind=ddp"]))
    with pytest.raises(ValueError, match=r"protocol\.kind 'gossipy' is unknown; known: \['ddp', 'diloco'"):
        registry.protocol_class("gossipy")


def test_the_union_is_every_registered_settings_class() -> None:
    assert registry.settings_models() == [ProtocolSettings.registry[k] for k in sorted(ProtocolSettings.registry)]
    assert {"ddp", "diloco", "econtrol", "sparseloco"} <= set(ProtocolSettings.registry)
    for kind in ("diloco", "econtrol", "sparseloco"):
        cls = registry.protocol_class(kind)
        assert cls is Protocol.registry[kind] and cls.settings is ProtocolSettings.registry[kind]


NEW_KIND = "throwaway-averaging"
NEW_MODULE = textwrap.dedent(
    f'''
    """A protocol nobody listed anywhere: one file, its settings and its class."""
    from typing import Literal

    from protocols.compressed import AveragingProtocol, AveragingSettings


    class ThrowawayConfig(AveragingSettings):
        kind: Literal["{NEW_KIND}"] = "{NEW_KIND}"


    class Throwaway(AveragingProtocol):
        settings = ThrowawayConfig

        @classmethod
        def from_settings(cls, settings):
            return cls(settings.outer_lr, settings.outer_momentum, nesterov=False)
    '''
)


@pytest.fixture
def extra_protocol_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory on the `protocols` package path holding one new protocol file; afterwards the path,
    the module and both registries are as they were (and discovery forgets the file)."""
    (tmp_path / "zz_throwaway_protocol.py").write_text(NEW_MODULE)
    protocols.__path__.append(str(tmp_path))
    registry.discover.cache_clear()
    try:
        yield tmp_path
    finally:
        protocols.__path__.remove(str(tmp_path))
        sys.modules.pop("protocols.zz_throwaway_protocol", None)
        ProtocolSettings.registry.pop(NEW_KIND, None)
        Protocol.registry.pop(NEW_KIND, None)
        registry.discover.cache_clear()
        registry.discover()


def test_a_new_protocol_file_is_picked_up_without_editing_any_list(extra_protocol_dir: Path) -> None:
    assert NEW_KIND not in ProtocolSettings.registry
    cls = registry.protocol_class(NEW_KIND)  # discovery imports the new file by itself
    assert cls.__name__ == "Throwaway" and cls.kind == NEW_KIND
    assert Protocol.registry[NEW_KIND] is cls
    settings = ProtocolSettings.registry[NEW_KIND]
    assert cls.settings is settings and settings in registry.settings_models()
    built = cls.from_settings(settings(outer_lr=0.5))
    assert built.outer_lr == 0.5 and built.uplink_codec == "dense"
    assert "zz_throwaway_protocol" in registry.discover()


def test_the_throwaway_protocol_left_no_trace() -> None:
    # Runs after the test above (file order): its fixture removed everything it registered.
    assert NEW_KIND not in ProtocolSettings.registry and NEW_KIND not in Protocol.registry
    assert "zz_throwaway_protocol" not in registry.discover()


def test_with_cluster_replaces_only_the_named_fields_of_a_copy() -> None:
    cfg = parse_config({"cluster": {"workers": 3, "token": "old"}})
    copied = with_cluster(cfg, token="new", device="cpu")
    assert (copied.cluster.token, copied.cluster.device, copied.cluster.workers) == ("new", "cpu", 3)
    assert cfg.cluster.token == "old"  # the original is untouched
    assert copied.model == cfg.model and copied.protocol == cfg.protocol
