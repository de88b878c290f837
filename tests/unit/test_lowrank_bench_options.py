"""bench.lowrank's command line: the model shape and seed options, and the plan they make.

No runs here (tests/integration/test_lowrank_bench.py runs a tiny plan): what is checked is that a shape reaches
the plan whole, that bad shapes are refused with one error naming the problem, and that the configs the
contenders run carry the plan's shape and seed.
"""

from __future__ import annotations

import argparse

import pytest

from bench.lowrank import Plan, model_note, parse_model
from bench.lowrank_runs import MODEL, finetune_config, pretrain_config


def test_model_fields_replace_the_default_shape() -> None:
    shape = parse_model("n_embd=192, n_head=6")
    assert shape == {**MODEL, "n_embd": 192, "n_head": 6}
    assert MODEL["n_embd"] == 128  # the module default is not mutated
    assert parse_model("n_layer=4") == {**MODEL, "n_layer": 4}


@pytest.mark.parametrize("text, says", [
    ("n_embd=130", "multiple of n_head"),  # 4 heads do not divide 130
    ("n_layer=0", "n_layer"),
    ("width=192", "n_layer/n_head/n_embd/block_size=integer pairs"),
    ("n_embd=19.2", "integer pairs"),
    ("n_embd", "integer pairs"),
])
def test_bad_model_shapes_are_refused(text: str, says: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=says):
        parse_model(text)


def test_model_note_says_whether_the_shape_is_the_default() -> None:
    assert model_note(dict(MODEL)).startswith("the default GPT")
    note = model_note(parse_model("n_embd=192,n_head=6"))
    assert note.startswith("a GPT") and "192 wide" in note and "6 heads" in note


def test_configs_carry_the_plans_shape_and_seed() -> None:
    plan = Plan(model=parse_model("n_embd=192,n_head=6"), seed=7)
    pre = pretrain_config(10, 0, plan.model, plan.seed, eval_every=5)
    fine = finetune_config("pissa-r8", 10, "base.pt", 3e-3, 0, 5, None, plan.model, plan.seed)
    for cfg in (pre, fine):
        assert (cfg.model.n_embd, cfg.model.n_head, cfg.model.n_layer) == (192, 6, MODEL["n_layer"])
        assert cfg.seed == 7
    assert pre.train.eval_every_steps == 5
    default = finetune_config("full", 10, "base.pt", 3e-3, 0, 5)
    assert default.model.n_embd == MODEL["n_embd"] and default.seed == 0
