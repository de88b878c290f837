"""bench.coordinator_scale --quick: a real coordinator process, two client processes and a heartbeat probe on
loopback. Checked: the JSON has a row per contender with the fields the table rests on, the bytes match the
update pushed, the coordinator's memory and the probe's heartbeats were really measured, and the targets are
judged. No timing thresholds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import bench.common
from bench import perf_profile
from bench.coordinator_scale import _split, main, verdicts
from bench.scale_procs import PEAK_STEP_BYTES


def test_workers_are_split_over_the_client_processes_without_loss() -> None:
    assert _split(10, 3) == [4, 3, 3]
    assert _split(1000, 2) == [500, 500]
    assert _split(2, 4) == [1, 1]  # never a process without a worker


def _row(workers: int, spr: float, rss: float = 2.0, beat: float = 0.5,
         cpu: float | None = None) -> dict[str, float | int | str]:
    cpu_s = spr / 2 if cpu is None else cpu
    return {"contender": f"workers-{workers}", "workers": workers, "seconds_per_round_per_worker": spr / workers,
            "rss_over_model": rss, "rss_growth_over_model": rss / 2, "max_heartbeat_delay_s": beat,
            "coordinator_cpu_s_per_round_per_worker": cpu_s / workers}


def test_targets_are_judged_from_the_rows() -> None:
    met = verdicts([_row(10, 1.0), _row(100, 9.0), _row(1000, 95.0, rss=2.5, beat=1.9)])
    assert met["round_time_at_most_linear"]["met"]
    assert met["memory_at_most_3x_model"]["at"] == "workers-1000"
    assert met["memory_at_most_3x_model"]["met_total"] and met["memory_at_most_3x_model"]["met_growth"]
    assert met["heartbeat_within_interval"]["met"]
    missed = verdicts([_row(10, 1.0), _row(100, 30.0), _row(1000, 95.0, rss=7.0, beat=2.5)])
    assert not missed["round_time_at_most_linear"]["met"]  # 100 workers took 30x the time of 10
    assert not missed["memory_at_most_3x_model"]["met_total"]
    assert not missed["memory_at_most_3x_model"]["met_growth"]  # a growth of 3.5x the model
    assert not missed["heartbeat_within_interval"]["met"]
    stopped = _row(1000, 50.0) | {"finished": False}  # one fast round closed, then stopped at the time limit
    cut = verdicts([_row(10, 1.0), _row(100, 9.0), stopped])
    assert not cut["round_time_at_most_linear"]["met"]
    assert cut["round_time_at_most_linear"]["unfinished"] == ["workers-1000"]
    assert cut["memory_at_most_3x_model"]["finished"] is False
    assert not cut["coordinator_cpu_at_most_linear"]["met"]


def test_coordinator_cpu_is_judged_apart_from_wall_time() -> None:
    """Wall time per worker grew 1.4x from 100 to 1,000 workers, the coordinator's own CPU per worker did not."""
    shared = verdicts([_row(10, 1.0, cpu=0.5), _row(100, 9.0, cpu=4.0), _row(1000, 127.0, cpu=41.0)])
    assert not shared["round_time_at_most_linear"]["met"]
    assert shared["coordinator_cpu_at_most_linear"]["met"]
    grew = verdicts([_row(10, 1.0, cpu=0.5), _row(100, 9.0, cpu=4.0), _row(1000, 90.0, cpu=60.0)])
    assert grew["round_time_at_most_linear"]["met"] and not grew["coordinator_cpu_at_most_linear"]["met"]
    no_cpu = verdicts([_row(10, 1.0), _row(100, 9.0) | {"coordinator_cpu_s_per_round_per_worker": None}])
    assert not no_cpu["coordinator_cpu_at_most_linear"]["met"]  # a row without the measure is not a pass


def test_quick_run_writes_a_row_per_contender(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench.common, "RESULTS", tmp_path)
    main(["--quick", "--out", "scale"])
    doc = json.loads((tmp_path / "scale.json").read_text())
    assert doc["bench"] == "scale"
    rows = {r["contender"]: r for r in doc["rows"]}
    assert sorted(rows) == ["workers-4", "workers-8"]
    for name, r in rows.items():
        assert r["workers"] == int(name.split("-")[1])
        assert r["rounds"] == 2 and len(r["round_seconds"]) == 2
        assert r["seconds_per_round"] > 0
        assert r["peak_rss_bytes"] >= r["baseline_rss_bytes"] > 0
        assert r["rss_over_model"] == pytest.approx(r["peak_rss_bytes"] / r["model_fp32_bytes"])
        assert r["heartbeat_samples"] > 0 and r["max_heartbeat_delay_s"] > 0
        # Every worker pushed its update each round (plus the stream's headers), and pulled each aggregate.
        assert r["protocol_sent_per_worker"] >= 2 * r["update_bytes"] > 0
        assert r["protocol_received_per_worker"] > 0
        assert r["control_sent_per_worker"] > 0
        assert r["bytes_sent_per_worker"] >= r["protocol_sent_per_worker"] + r["control_sent_per_worker"]
        assert r["bytes_received_per_worker"] >= r["protocol_received_per_worker"] + r["control_received_per_worker"]
        assert r["bytes_total_per_worker"] == r["bytes_sent_per_worker"] + r["bytes_received_per_worker"]
        # One round after the first: the coordinator's CPU from round 0's close to round 1's, and the clients'.
        assert r["coordinator_cpu_s_by_round"] == [r["coordinator_cpu_s_per_round"]]
        assert r["coordinator_cpu_s_per_round"] > 0 and r["clients_cpu_s"] > 0
        assert len(r["tracked_objects_by_round"]) == r["rounds"] and min(r["tracked_objects_by_round"]) > 0
        # The server's pool threads are still up as the run ends, each with its stack.
        kinds = r["memory_by_kind"]
        assert kinds["threads"] > r["workers"] and kinds["thread_stack_count"] >= r["workers"]
        assert r["memory_growth_by_kind"]["thread_stack_count"] > 0
        # What the highest sampled resident set was made of: taken within PEAK_STEP_BYTES of it.
        at_peak = r["memory_by_kind_at_peak"]
        assert r["sampled_peak_rss_bytes"] - PEAK_STEP_BYTES <= at_peak["rss"] <= r["peak_rss_bytes"]
        assert at_peak["malloc_in_use"] > 0 and set(r["memory_growth_at_peak"]) >= {"main_heap", "other_anonymous"}
        # The coordinator saw every heartbeat the probe timed while rounds ran (bench/heartbeat_split.py).
        split = r["heartbeat_split"]
        assert split["probe_beats_traced"] >= r["heartbeat_samples"] and split["matched"] <= split["slow_samples"]
    assert set(doc["targets"]) == {"round_time_at_most_linear", "memory_at_most_3x_model",
                                   "heartbeat_within_interval", "coordinator_cpu_at_most_linear"}
    assert isinstance(doc["targets"]["heartbeat_within_interval"]["met"], bool)


@pytest.mark.skipif(perf_profile.available() is not None, reason=f"{perf_profile.available()}")
def test_perf_samples_the_coordinator_per_group(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench.common, "RESULTS", tmp_path)
    # One contender of --quick's two: the sampling is the same for every row.
    main(["--workers", "4", "--rounds", "2", "--model", "quick", "--perf", "--out", "scale"])
    doc = json.loads((tmp_path / "scale.json").read_text())
    assert doc["config"]["perf"] is True and [r["contender"] for r in doc["rows"]] == ["workers-4"]
    for r in doc["rows"]:
        groups = r["perf"]["samples_by_group"]
        assert r["perf"]["samples"] == sum(groups.values()) > 0
        assert groups.get("python", 0) > 0  # it sampled the interpreter serving the run, not an empty process
        assert r["perf_samples_per_worker_by_group"] == {g: n / r["workers"] for g, n in groups.items()}
        assert r["perf"]["top_symbols"] and all(n > 0 for _, n in r["perf"]["top_symbols"])
