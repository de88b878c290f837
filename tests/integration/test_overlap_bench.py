"""bench.overlap on a tiny grid: a real coordinator and 4 worker processes per run, behind emulated links.

What is checked is what the benchmark's table rests on: utilization is relative to the compute-only
ceiling (1.0 by definition), a slower link lowers synchronous DiLoCo's utilization, the link really held
the bytes the transport moved, CO2 moves the same bytes as synchronous rounds, and the 50% speed is
found from the utilization curve. Ratios and inequalities only: no wall-clock thresholds.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from bench.overlap import Grid, collect, ddp_steps, half_utilization_speed, plot

REQUIRED = ("contender", "inner_steps", "link_mbps", "compute_utilization", "eval_loss", "eval_loss_vs_diloco_sync",
            "bytes_total_per_worker", "blocked_fraction", "tokens_per_s", "seconds")


def test_half_utilization_speed_follows_the_compute_over_compute_plus_transfer_model() -> None:
    compute, transfer = 2.0, 30.0  # seconds of compute per round; seconds of transfer per round at 1 Mbit/s

    def u(b: float) -> float:
        return compute / (compute + transfer / b)

    b50, how = half_utilization_speed([(b, u(b)) for b in (1000, 5, 100, 20)])
    assert b50 == pytest.approx(transfer / compute)
    assert how == "interpolated between 5 and 20 Mbit/s"
    b50, how = half_utilization_speed([(b, u(b)) for b in (100, 1000)])  # no bracket: the model's slope
    assert b50 == pytest.approx(transfer / compute)
    assert how.startswith("extrapolated from 100 Mbit/s")


def test_ddp_runs_the_budget_unless_the_link_would_hold_it_longer_than_allowed() -> None:
    assert ddp_steps(384, None, 100_000, 30.0) == 384
    assert ddp_steps(384, 1000.0, 100_000, 30.0) == 384
    slow = ddp_steps(384, 5.0, 100_000, 30.0)  # 0.96 s of ring transfer per step at 5 Mbit/s
    assert slow == 31
    assert ddp_steps(384, 0.01, 100_000, 30.0) == 16  # never fewer than 16 steps
    assert ddp_steps(8, 0.01, 100_000, 30.0) == 8


def test_tiny_grid_rows_through_real_processes(tmp_path: Path) -> None:
    grid = Grid(steps=32, inner_steps=[8], bandwidths=[20.0, 1000.0],
                contenders=["compute-only", "diloco-sync", "diloco-co2"], extras=False)
    doc = collect(grid, log=lambda _: None)
    assert doc["failures"] == []
    rows = doc["rows"]
    assert [(r["contender"], r["link_mbps"]) for r in rows] == [
        ("compute-only", None),
        ("diloco-sync", 20.0), ("diloco-co2", 20.0),
        ("diloco-sync", 1000.0), ("diloco-co2", 1000.0),
    ]
    for r in rows:
        assert all(key in r for key in REQUIRED), r
        assert r["eval_loss"] is not None and math.isfinite(r["eval_loss"])
        assert r["steps"] == 32
    ceiling, *runs = rows
    assert ceiling["compute_utilization"] == 1.0
    assert ceiling["bytes_total_per_worker"] == 0
    assert len(doc["compute_only_tokens_per_s"]) == 3  # before the first block and after each
    for r in runs:
        assert r["inner_steps"] == 8
        assert r["compute_utilization"] == pytest.approx(r["tokens_per_s"] / r["ceiling_tokens_per_s"])
        assert 0 < r["compute_utilization"] and 0 <= r["blocked_fraction"] < 1
        assert r["bytes_total_per_worker"] > 0
        # Every process said what it cost: each worker's job and the coordinator's serving took CPU, and the
        # CPU-bound utilization is compute-only's CPU over all of it.
        assert r["worker_cpu_s"] > 0 and r["ceiling_worker_cpu_s"] > 0 and r["coordinator_cpu_s"] > 0
        assert r["cpu_bound_utilization"] == pytest.approx(
            4 * r["ceiling_worker_cpu_s"] / (4 * r["worker_cpu_s"] + r["coordinator_cpu_s"]))
    assert ceiling["coordinator_cpu_s"] == 0 and ceiling["worker_cpu_s"] > 0
    sync = {r["link_mbps"]: r for r in runs if r["contender"] == "diloco-sync"}
    co2 = {r["link_mbps"]: r for r in runs if r["contender"] == "diloco-co2"}
    assert sync[20.0]["compute_utilization"] < sync[1000.0]["compute_utilization"]
    # Dense rounds move one model up and one down each; at 20 Mbit/s that takes (nearly all of) the
    # synchronous run's time: the emulated link held every byte the transport counted.
    assert sync[20.0]["seconds"] >= 0.8 * sync[20.0]["bytes_total_per_worker"] * 8 / 20e6
    for link in (20.0, 1000.0):
        assert sync[link]["eval_loss_vs_diloco_sync"] == 1.0
        assert co2[link]["eval_loss_vs_diloco_sync"] == pytest.approx(co2[link]["eval_loss"] / sync[link]["eval_loss"])
        # Overlap changes when the bytes move, not how many.
        assert co2[link]["bytes_total_per_worker"] == pytest.approx(sync[link]["bytes_total_per_worker"], rel=0.05)
    path = plot(doc, tmp_path / "overlap.png")
    assert path.stat().st_size > 0


def test_an_arrival_contender_merges_at_the_grids_delay_and_says_so(tmp_path: Path) -> None:
    grid = Grid(steps=32, inner_steps=[8], bandwidths=[1000.0], contenders=["compute-only", "sparseloco-arrival"],
                extras=False, arrival_delay=2)
    assert grid.overlap_for("sparseloco-arrival") == {"delay_steps": 2} and grid.overlap_for("sparseloco-co2") is None
    doc = collect(grid, log=lambda _: None)
    assert doc["failures"] == []
    ceiling, arrival = doc["rows"]
    assert ceiling.get("merged_after_steps") is None
    # 4 rounds of 8 steps: each of the last 3 merged its predecessor's aggregate after exactly 2 steps.
    assert arrival["contender"] == "sparseloco-arrival" and arrival["merged_after_steps"] == 2
    assert arrival["eval_loss"] is not None and arrival["bytes_total_per_worker"] > 0


def test_the_arrival_delay_flag_takes_steps_or_none() -> None:
    from bench.overlap import _delay

    assert _delay("8") == 8 and _delay("0") == 0 and _delay("None") is None
    for bad in ("-1", "x", "2.5"):
        with pytest.raises(Exception, match="an arrival delay is a number of inner steps >= 0 or 'none'"):
            _delay(bad)
