"""bench.faults' accounting: the work a killed worker process lost, from the progress lines it printed, and the
overhead over repeated pairs of runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bench import faults
from bench.faults import _killed_steps, bench_config


def test_a_killed_process_computed_from_its_first_rounds_start_to_the_step_it_died_at(tmp_path: Path) -> None:
    log = tmp_path / "w3.1.log"
    log.write_text("w3 round 2 step 18: train 3.449\nw3 round 3 step 24: train 3.339\n")
    assert _killed_steps(log, crash_at=27, inner_steps=6) == 27 - 12  # rounds 2 and 3, half of round 4
    log.write_text("")  # died in the round it started in, before printing anything
    assert _killed_steps(log, crash_at=15, inner_steps=6) == 3


def test_the_bench_config_waits_for_every_worker_and_detects_a_death_in_two_seconds() -> None:
    cfg = bench_config(workers=4, rounds=6, inner_steps=6)
    assert cfg.cluster.quorum == 4 and cfg.cluster.heartbeat_timeout_s == 2.0 and cfg.rounds == 6


def test_repeats_alternate_the_pairs_order_and_the_overhead_is_the_median_of_the_pairs_ratios(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The runs' timings, in the order run_all asks for them: faulty, then pairs (ff, off), (off, ff), (ff, off).
    train = iter([50.0, 10.0, 10.0, 11.0, 12.0, 10.0, 20.0])
    order: list[str] = []

    def fake_run(contender: str, cfg: Any, every: int, work: Path) -> dict[str, Any]:
        order.append(contender)
        t = next(train)
        return {"contender": contender, "train_s": t, "wall_s": t + 5, "eval_loss": 3.0,
                "training_efficiency": 1.0 if contender != "faulty" else 0.9}

    monkeypatch.setattr(faults, "run_contender", fake_run)
    rows, runs = faults.run_all(bench_config(workers=2, rounds=3, inner_steps=2), 1, 3, tmp_path)
    assert order == ["faulty", "fault-free", "ft-off", "ft-off", "fault-free", "fault-free", "ft-off"]
    by = {r["contender"]: r for r in rows}
    assert by["fault-free"]["repeats"] == 3 and by["faulty"]["repeats"] == 1 and len(runs) == 7
    assert by["fault-free"]["train_s"] == 10.0 and by["ft-off"]["train_s"] == 11.0  # medians of (10,12,10), (10,11,20)
    # The pairs' ratios are 10/10, 12/11 and 10/20: their median is 1.0, not the ratio of the medians (10/11).
    assert by["fault-free"]["train_vs_ft_off"] == 1.0
    assert by["ft-off"]["train_vs_ft_off"] == 1.0 and by["faulty"]["train_vs_ft_off"] == 50.0 / 11.0
