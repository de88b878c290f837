"""bench.stragglers --quick: the four contenders through a real coordinator and 4 worker processes.

What is checked is what the benchmark's table rests on: the efficiency and throughput columns are built
from the tokens each run really trained and really got into an aggregate, a dropped late update's tokens
are what the efficiency loses, and adaptive inner steps give the straggler fewer tokens.
Ratios and counts only: no wall-clock thresholds.
"""

from __future__ import annotations

import math

import pytest

from bench.stragglers import COLUMNS, DEADLINE_FACTOR, QUICK, collect
from bench.stragglers_runs import CONTENDERS


def test_quick_bench_rows_through_real_processes() -> None:
    doc = collect(QUICK, log=lambda _: None)
    rows = {r["contender"]: r for r in doc["rows"]}
    assert list(rows) == list(CONTENDERS)
    for r in rows.values():
        assert all(column in r for column in COLUMNS), r
        assert r["eval_loss"] is not None and math.isfinite(r["eval_loss"])
        assert 0 < r["useful_tokens"] <= r["tokens"] and r["training_efficiency"] == r["useful_tokens"] / r["tokens"]
        assert r["tokens_per_s"] == pytest.approx(r["useful_tokens"] / r["wall_s"])
        assert r["rounds"] == QUICK.steps // QUICK.inner_steps
    uniform, wait, fixed, adaptive = (rows[name] for name in CONTENDERS)
    assert uniform["slowdowns"] == [1.0] * 4
    for r in (wait, fixed, adaptive):  # one worker of four, 3x slower
        assert sorted(r["slowdowns"]) == [1.0, 1.0, 1.0, 3.0]
    for r in (uniform, wait):  # every round waits for all: nothing late, nothing wasted
        assert (r["late_updates"], r["training_efficiency"]) == (0, 1.0)
    # Waiting for a straggler changes when the updates come, not what they are.
    assert wait["eval_loss"] == pytest.approx(uniform["eval_loss"], rel=1e-3)
    # Under the fixed deadline a late update is dropped, and its tokens are what the efficiency loses (whether
    # the straggler misses a round depends on how its sleeps share this machine's cores: not asserted).
    for r in (fixed, adaptive):
        assert (r["late_updates"] == 0) == (r["training_efficiency"] == 1.0)
    assert fixed["deadline_s"] == adaptive["deadline_s"] > 0 and DEADLINE_FACTOR == 1.5
    # Adaptive inner steps: the straggler trains fewer tokens than a fast worker (from round 1 on).
    assert adaptive["slow_worker_tokens_fraction"] < 1.0
    slow_id = next(w for w, steps in adaptive["steps_per_round"].items() if sum(steps) < QUICK.steps)
    assert adaptive["steps_per_round"][slow_id][0] == QUICK.inner_steps
    assert uniform["wall_s_per_token_vs_uniform"] == 1.0 and uniform["eval_loss_vs_uniform"] == 1.0
    targets = doc["targets_stragglers_adaptive"]
    assert targets["training_efficiency >= 0.95"] == (adaptive["training_efficiency"] >= 0.95)
    assert targets["eval_loss_vs_uniform <= 1.02"] == (adaptive["eval_loss_vs_uniform"] <= 1.02)
