"""bench.faults' accounting of the work a killed worker process lost, from the progress lines it printed."""

from __future__ import annotations

from pathlib import Path

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
