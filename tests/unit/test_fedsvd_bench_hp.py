"""bench.fedsvd's per-protocol lrs are the ones its committed sweep found best, and HP_SWEEP records that sweep."""

from __future__ import annotations

import json

from bench.common import RESULTS
from bench.fedsvd import HP, HP_SWEEP, METHODS, best_lrs


def test_each_protocols_lr_is_the_best_of_the_committed_sweep() -> None:
    sweep = json.loads((RESULTS / "fedsvd_sweep.json").read_text())
    assert sweep["seed"] == HP_SWEEP["seed"] and {r["method"] for r in sweep["runs"]} == set(METHODS)
    assert best_lrs(sweep["runs"]) == HP.lrs
    for r in sweep["runs"]:
        assert HP_SWEEP["final_eval_loss"][r["method"]][f"{r['lr']:g}"] == r["final_eval_loss"]
    assert sweep["hp"] == {
        "rounds": HP.rounds, "fraction": HP.fraction, "local_epochs": HP.local_epochs,
        "max_local_steps": HP.max_local_steps, "batch_size": HP.batch_size}


def test_best_lrs_takes_each_protocols_lowest_loss() -> None:
    runs = [{"method": "a", "lr": 0.1, "final_eval_loss": 2.0}, {"method": "a", "lr": 0.2, "final_eval_loss": 1.9},
            {"method": "b", "lr": 0.3, "final_eval_loss": 1.0}, {"method": "b", "lr": 0.6, "final_eval_loss": 1.1}]
    assert best_lrs(runs) == {"a": 0.2, "b": 0.3}
