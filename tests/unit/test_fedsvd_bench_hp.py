"""bench.fedsvd's per-protocol lrs at each rank are the ones that rank's committed sweep found best (HP_SWEEP
records each sweep), and --rank's parsing."""

from __future__ import annotations

import json

import pytest

from bench.common import RESULTS
from bench.fedsvd import HP, HP_SWEEP, LRS, METHODS, SWEEP_SEED
from bench.fedsvd_sweep import best_lrs


@pytest.mark.parametrize("rank", sorted(HP_SWEEP))
def test_each_ranks_lrs_are_the_best_of_its_committed_sweep(rank: int) -> None:
    record = HP_SWEEP[rank]
    sweep = json.loads((RESULTS / record["file"]).read_text())
    assert sweep["seed"] == record["seed"] == SWEEP_SEED and {r["method"] for r in sweep["runs"]} == set(METHODS)
    assert best_lrs(sweep["runs"]) == LRS[rank]
    recorded = {(kind, lr) for kind, losses in record["final_eval_loss"].items() for lr in losses}
    assert recorded == {(r["method"], f"{r['lr']:g}") for r in sweep["runs"]}
    for r in sweep["runs"]:
        assert record["final_eval_loss"][r["method"]][f"{r['lr']:g}"] == round(r["final_eval_loss"], 4)
        if "base_eval_loss" in r:  # the rank-8 sweep's runs predate this field (its base: 2.1805, BENCHMARKS.md)
            assert round(r["base_eval_loss"], 4) == record["base_eval_loss"]
    # The rank-8 sweep predates --rank: its hp has no rank field (it ran at rank 8).
    assert sweep["hp"] == {
        "rounds": HP.rounds, "fraction": HP.fraction, "local_epochs": HP.local_epochs,
        "max_local_steps": HP.max_local_steps, "batch_size": HP.batch_size, **({"rank": rank} if rank != 8 else {})}
    assert HP.lrs == LRS[HP.rank]


def test_best_lrs_takes_each_protocols_lowest_loss() -> None:
    runs = [{"method": "a", "lr": 0.1, "final_eval_loss": 2.0}, {"method": "a", "lr": 0.2, "final_eval_loss": 1.9},
            {"method": "b", "lr": 0.3, "final_eval_loss": 1.0}, {"method": "b", "lr": 0.6, "final_eval_loss": 1.1}]
    assert best_lrs(runs) == {"a": 0.2, "b": 0.3}


def test_rank_sets_lora_rank_and_alpha_twice_it() -> None:
    from bench.fedsvd import Hyper, _rank, finetune_config

    assert _rank("32") == 32
    cfg = finetune_config("fedsvd", 0, Hyper(rank=32), "unused", True, 0, 125, 1)
    assert cfg.lowrank is not None and (cfg.lowrank.rank, cfg.lowrank.alpha) == (32, 64)
    assert HP.rank == 8


@pytest.mark.parametrize("text", ["0", "-8", "129", "8.5", "eight"])
def test_rank_outside_1_to_the_model_width_is_one_clear_error(text: str, capsys: pytest.CaptureFixture[str]) -> None:
    from bench.fedsvd import main

    with pytest.raises(SystemExit) as exit_:
        main(["--rank", text])
    assert exit_.value.code == 2
    assert f"expected a LoRA rank in [1, 128], got '{text}'" in capsys.readouterr().err


def test_relative_grid_multiplies_each_protocols_lr() -> None:
    from bench.fedsvd_sweep import grid

    assert grid([0.5, 2], ("fedsvd", "fedavg-lora"), relative_to=HP) == [
        ("fedsvd", 0.1), ("fedsvd", 0.4), ("fedavg-lora", 0.075), ("fedavg-lora", 0.3)]
    assert grid([0.3], ("ffa-lora",)) == [("ffa-lora", 0.3)]
