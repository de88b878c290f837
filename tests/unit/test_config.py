"""Run configuration: defaults, YAML recipes, dotted overrides, and errors that name the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from protocols.config import (
    CompressionConfig,
    ConfigError,
    DDPConfig,
    DiLoCoConfig,
    EControlConfig,
    RunConfig,
    SparseLoCoConfig,
    apply_overrides,
    load_config,
    parse_config,
    to_yaml,
)
from protocols.diloco import DiLoCo
from protocols.registry import build_protocol


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


def test_yaml_recipe_loads_and_protocol_kind_defaults_to_diloco(tmp_path: Path) -> None:
    path = _recipe(
        tmp_path,
        "name: tiny\nprotocol:\n  inner_steps: 25\ntrain:\n  steps: 60\ncluster:\n  workers: 3\n  min_workers: 2\n",
    )
    cfg = load_config(path)
    assert cfg.name == "tiny"
    assert isinstance(cfg.protocol, DiLoCoConfig) and cfg.protocol.inner_steps == 25
    assert cfg.cluster.quorum == 2
    assert cfg.rounds == 3  # ceil(60 / 25): the last round is short


def test_ddp_recipe_selects_the_ddp_branch(tmp_path: Path) -> None:
    cfg = load_config(_recipe(tmp_path, "protocol:\n  kind: ddp\n  backend: gloo\n"))
    assert cfg.protocol == DDPConfig(backend="gloo")
    assert cfg.rounds == cfg.train.steps  # no inner loop: one "round" per step


def test_sparseloco_and_econtrol_parse_with_their_papers_compression_defaults() -> None:
    sparse = parse_config({"protocol": {"kind": "sparseloco", "compression": {"density": 0.03}}})
    assert isinstance(sparse.protocol, SparseLoCoConfig)
    comp = sparse.protocol.compression
    # Overriding one field keeps the paper's others (codec, EF14 with decay 0.95).
    assert (comp.codec, comp.density, comp.error_feedback, comp.decay) == ("sparseloco", 0.03, "ef14", 0.95)
    assert sparse.rounds == -(-sparse.train.steps // 15)
    econtrol = parse_config({"protocol": {"kind": "econtrol", "compression": {"codec": "int8"}}})
    assert isinstance(econtrol.protocol, EControlConfig)
    ecomp = econtrol.protocol.compression
    assert (ecomp.codec, ecomp.error_feedback, ecomp.eta) == ("int8", "econtrol", 0.1)
    assert econtrol.rounds == econtrol.train.steps  # inner_steps 1: one round per step
    assert DiLoCoConfig().compression == CompressionConfig()  # DiLoCo's paper sends dense tensors


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
    cfg = load_config(None, ["protocol.inner_steps=7", "cluster.min_workers=2", "seed=3"])
    assert load_config(_recipe(tmp_path, to_yaml(cfg))) == cfg


@pytest.mark.parametrize(
    ("data", "field", "detail"),
    [
        ({"protocol": {"kind": "gossipy"}}, "'protocol'", "'diloco', 'ddp'"),
        ({"protocol": {"inner_steps": -5}}, "inner_steps", "greater than 0"),
        ({"protocol": {"inner_steps": 0}}, "inner_steps", "greater than 0"),
        ({"modle": {"n_layer": 2}}, "'modle'", "Extra inputs"),
        ({"protocol": {"kind": "ddp", "inner_steps": 5}}, "inner_steps", "Extra inputs"),
        ({"model": {"n_layer": None}}, "model.n_layer", "valid integer"),
        ({"cluster": {"workers": 2, "min_workers": 3}}, "'cluster'", "min_workers (3) cannot exceed workers (2)"),
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
