"""Stragglers over gRPC: real coordinator and worker processes on loopback, a worker slowed by
`faults.stragglers` (it sleeps (factor - 1) x each measured step). Asserted on the recorded run: metrics.jsonl
round records and each worker's result, never on wall-clock times."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import tiny_config
from tests.integration.procs import finish, start_coordinator, start_worker, write_recipe


def run(tmp_path: Path, workers: int, **overrides: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Run a tiny DiLoCo job over gRPC; (round records of metrics.jsonl, each worker's result)."""
    cfg = tiny_config(name="stragglers", run_dir=str(tmp_path / "runs"), **overrides)
    coord, address = start_coordinator(write_recipe(cfg, tmp_path / "stragglers.yaml"), tmp_path)
    procs = [start_worker(address, tmp_path, i) for i in range(workers)]
    for i, proc in enumerate(procs):  # a dropped late update never kills a worker: every one exits 0
        assert finish(proc, 300, tmp_path / f"worker{i}.log") == 0, (tmp_path / f"worker{i}.log").read_text()
    assert finish(coord, 300, tmp_path / "coordinator.log") == 0
    rows = [json.loads(line) for line in (tmp_path / "runs" / "stragglers" / "metrics.jsonl").read_text().splitlines()]
    results = [json.loads((tmp_path / f"worker{i}.json").read_text()) for i in range(workers)]
    summary = json.loads((tmp_path / "runs" / "stragglers" / "summary.json").read_text())
    assert summary["rounds"] == len([row for row in rows if row["event"] == "round"])
    # Whatever happened to its updates, every worker ends on the same replica (a straggler resyncs to it).
    assert len({r["param_hash"] for r in results}) == 1
    return [row for row in rows if row["event"] == "round"], results


def test_adaptive_inner_steps_keep_a_3x_straggler_in_every_round_with_a_third_of_the_tokens(tmp_path: Path) -> None:
    rounds, inner = 6, 12
    records, results = run(
        tmp_path, 2,
        protocol={"kind": "diloco", "inner_steps": inner, "adaptive_inner_steps": True},
        train={"steps": inner * rounds, "lr": 1e-2, "warmup_steps": 1, "eval_batches": 2, "eval_every_steps": 1000},
        cluster={"workers": 2, "round_deadline_s": 120, "heartbeat_interval_s": 0.5},
        faults={"stragglers": {"factors": [3, 1]}},
    )
    slow = next(r for r in results if r["slowdown"] == 3.0)
    fast = next(r for r in results if r["slowdown"] == 1.0)
    assert [rec["round"] for rec in records] == list(range(rounds))
    for rec in records:  # nobody is left behind: every round waits for, and gets, both workers
        assert rec["closed_by"] == "all" and rec["workers"] == sorted([slow["worker_id"], fast["worker_id"]])
        assert rec["late_folded"] == {} and rec["late_dropped"] == []
    assert fast["steps_per_round"][0] == slow["steps_per_round"][0] == inner  # no speed measured before round 0
    # From round 1 on, the slow worker fits about a third of the steps in the fast worker's round time, and
    # reports that many tokens (generous bounds: step times on a loaded machine wander).
    later = records[1:]
    slow_tokens = sum(rec["tokens_per_worker"][slow["worker_id"]] for rec in later)
    fast_tokens = sum(rec["tokens_per_worker"][fast["worker_id"]] for rec in later)
    assert 0.15 <= slow_tokens / fast_tokens <= 0.6, (slow["steps_per_round"], fast["steps_per_round"])
    assert slow_tokens == sum(slow["steps_per_round"][1:]) * 8 * 32  # batch 8 x block 32 tokens a step


@pytest.mark.parametrize("late", ["drop", "stale"])
def test_a_late_update_under_a_fixed_deadline_is_dropped_or_folded_with_its_staleness_weight(
        tmp_path: Path, late: str) -> None:
    """One worker runs 3x slower; a round closes as soon as the two fast workers have reported (deadline
    50 ms, quorum 2), so its updates arrive after their round closed: while the run goes on, they are
    dropped or folded late as configured (after the last round, one can only be dropped)."""
    rounds, inner, stale_weight = 9, 8, 0.5
    records, results = run(
        tmp_path, 3,
        protocol={"kind": "diloco", "inner_steps": inner},
        train={"steps": inner * rounds, "lr": 1e-2, "warmup_steps": 1, "eval_batches": 2, "eval_every_steps": 1000},
        cluster={"workers": 3, "min_workers": 2, "round_deadline_s": 0.05, "heartbeat_interval_s": 0.5,
                 "late": late, "stale_weight": stale_weight},
        faults={"stragglers": {"factors": [3, 1, 1]}},
    )
    slow = next(r for r in results if r["slowdown"] == 3.0)
    assert [rec["round"] for rec in records] == list(range(rounds))
    dropped = [w for rec in records for w in rec["late_dropped"]]
    folded = {(sender, rec["round"]): weight for rec in records for sender, weight in rec["late_folded"].items()}
    folded_from = [sender.partition("@")[0] for sender, _ in folded]
    # On a loaded machine a fast worker may miss a 50 ms round too: counted per worker, the slow one at least once.
    assert slow["stale_updates"] >= 1
    for r in results:
        if late == "drop":
            assert r["late_folded"] == 0 and dropped.count(r["worker_id"]) <= r["stale_updates"]
            assert r["dropped_tokens"] == r["stale_updates"] * inner * 8 * 32  # every late one, dropped whole
        else:
            assert folded_from.count(r["worker_id"]) == r["late_folded"] <= r["stale_updates"]
    if late == "drop":
        assert folded == {} and dropped.count(slow["worker_id"]) >= 1
    else:
        assert dropped == [] and slow["late_folded"] >= 1
        for (sender, folded_into), weight in folded.items():
            pushed_for = int(sender.partition("@")[2])
            assert pushed_for < folded_into
            # Weight 1 (no token weighting here) times stale_weight per round of lateness.
            assert weight == pytest.approx(stale_weight ** (folded_into - pushed_for))
