"""bench.fedsvd on its --quick plan: a tiny pretrained base, then FedSVD, FFA-LoRA and FedAvg-LoRA under DP on two
shared seeds, and the no-DP reference.

What is checked is what the benchmark's table and claim rest on: every run starts from the same base (round 0 is the
base's loss, the same for every run), the same seed gives every protocol the same clients and participation, the
noise multiplier is the same for a seed and the epsilon spent stays within the budget, DP changes the result, the
aggregate rows and the claim block are computed from the rows, and the bench's eval text is held out of every
client's training text. No loss-quality thresholds: a smoke run.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import pytest

from bench.fedsvd import DP, METHODS, QUICK, collect, finetune_config, heldout_lines_text, plot


def test_quick_plan(tmp_path: Path) -> None:
    doc = collect(QUICK, log=lambda _: None, work_dir=tmp_path, jobs=2)  # the runs in 2 processes
    rows = doc["rows"]
    runs = [r for r in rows if r["seed"] != "mean"]
    dp = [r for r in runs if r["dp"]]
    ref = [r for r in runs if not r["dp"]]
    assert sorted((r["method"], r["seed"]) for r in dp) == sorted((k, s) for k in METHODS for s in QUICK.seeds)
    assert sorted(r["method"] for r in ref) == sorted(METHODS) and {r["seed"] for r in ref} == {QUICK.seeds[0]}

    base = doc["base_eval_loss"]
    for r in runs:
        assert len(r["curve"]) == QUICK.hp.rounds + 1 and r["rounds"] == QUICK.hp.rounds
        assert [p["round"] for p in r["curve"]] == list(range(QUICK.hp.rounds + 1))
        assert all(math.isfinite(p["eval_loss"]) for p in r["curve"])
        assert r["final_eval_loss"] == r["curve"][-1]["eval_loss"]
        # B starts at zero under all three protocols: round 0 is the pretrained base itself, for every run.
        assert r["base_eval_loss"] == pytest.approx(base, abs=1e-5)
        assert r["final_script_eval_loss"] is not None and math.isfinite(r["final_script_eval_loss"])
        assert r["final_eval_loss"] != r["base_eval_loss"]  # the adapters trained
    for r in dp:
        assert r["noise_multiplier"] is not None and r["noise_multiplier"] > 0
        assert 0 < r["dp_epsilon_max"] <= DP["epsilon"]
        assert all(p["epsilon_max"] <= DP["epsilon"] for p in r["curve"])
    for r in ref:
        assert r["noise_multiplier"] is None and r["dp_epsilon_max"] is None

    for seed in QUICK.seeds:
        same = [r for r in dp if r["seed"] == seed]
        # Same seed: one noise plan, the same clients in the same rounds.
        assert len({r["noise_multiplier"] for r in same}) == 1
        assert len({r["clients_trained"] for r in same}) == 1 and len({r["client_updates"] for r in same}) == 1
        assert len({tuple(p["aggregated"] for p in r["curve"]) for r in same}) == 1
        # Different protocols end on different models; but after one round FedSVD's equals FFA-LoRA's: the same
        # frozen A, the same B aggregated, and the SVD re-factorization keeps the product B A.
        assert len({r["final_eval_loss"] for r in same}) == len(METHODS)
        first = {r["method"]: r["curve"][1]["eval_loss"] for r in same}
        assert first["fedsvd"] == pytest.approx(first["ffa-lora"], abs=1e-4)
        assert first["fedavg-lora"] != pytest.approx(first["ffa-lora"], abs=1e-6)
    by = {(r["method"], r["seed"], r["dp"]): r for r in runs}
    for kind in METHODS:
        assert by[(kind, QUICK.seeds[0], True)]["final_eval_loss"] != by[(kind, QUICK.seeds[0], False)][
            "final_eval_loss"]

    means = {r["method"]: r for r in rows if r["seed"] == "mean"}
    assert sorted(means) == sorted(METHODS)
    for kind, m in means.items():
        losses = [r["final_eval_loss"] for r in dp if r["method"] == kind]
        assert m["final_eval_loss"] == pytest.approx(statistics.fmean(losses))
        assert m["final_eval_loss_std"] == pytest.approx(statistics.stdev(losses))
        assert m["seeds"] == len(QUICK.seeds)

    claim = doc["claim"]
    for p in claim["per_seed"]:
        svd = by[("fedsvd", p["seed"], True)]["final_eval_loss"]
        expect = all(svd < by[(k, p["seed"], True)]["final_eval_loss"] for k in METHODS[1:])
        assert p["fedsvd_best"] is expect
    assert claim["on_mean"] is all(means["fedsvd"]["final_eval_loss"] < means[k]["final_eval_loss"]
                                   for k in METHODS[1:])
    assert claim["holds"] is False  # two seeds: the claim needs at least three
    assert claim["epsilon_within_budget"] is True

    png = plot(doc, tmp_path / "fedsvd.png")
    assert png.stat().st_size > 0


def test_eval_lines_are_held_out_of_every_client() -> None:
    from worker.data import FINETUNE_PLAYS
    from worker.federated.tasks import ShakespeareTask

    cfg = finetune_config("fedsvd", 0, QUICK.hp, "unused", True, QUICK.max_chars, QUICK.clients, 1)
    held = heldout_lines_text(FINETUNE_PLAYS, cfg.data.eval_fraction, QUICK.max_chars).splitlines()
    assert len(held) > 10 and not any(line.endswith(":") and line.upper() == line for line in held)
    task = ShakespeareTask(cfg)
    held_set = {line for line in held if len(line) > 20}  # short lines ("My lord.") recur in other plays too
    for c in range(task.num_clients()):
        lines = set(task.tokenizer.decode(task.clients[c]).splitlines())
        assert not lines & held_set, c
