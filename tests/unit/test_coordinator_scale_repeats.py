"""bench.coordinator_scale: a contender's repeated runs folded into its row."""

import pytest

from bench.coordinator_scale import combine_repeats, main


def run(seconds: float, beat: float, growth: float, finished: bool = True) -> dict:
    return {"contender": "workers-10", "seconds_per_round": seconds, "coordinator_cpu_s_per_round": seconds / 2,
            "max_heartbeat_delay_s": beat, "peak_rss_bytes": int(growth * 100), "rss_over_model": growth + 1,
            "rss_growth_over_model": growth, "finished": finished, "wall_s": seconds * 10,
            "heartbeat_split": {"slowest": {"latency_s": beat}}}


def test_the_row_is_the_median_run_with_the_worst_heartbeat_and_memory() -> None:
    row = combine_repeats([run(3.0, 0.1, 5.0), run(1.0, 1.9, 4.0), run(2.0, 0.2, 7.0)])
    assert row["seconds_per_round"] == 2.0 and row["wall_s"] == 20.0  # the median run's own fields
    assert row["max_heartbeat_delay_s"] == 1.9 and row["rss_growth_over_model"] == 7.0 and row["rss_over_model"] == 8.0
    assert row["repeat_seconds_per_round"] == [3.0, 1.0, 2.0] and row["repeats"] == 3
    assert [s["slowest"]["latency_s"] for s in row["repeat_heartbeat_split"]] == [0.1, 1.9, 0.2]


def test_an_even_count_takes_the_slower_middle_run_and_an_unfinished_one_counts_slowest() -> None:
    assert combine_repeats([run(1.0, 0.1, 1.0), run(2.0, 0.1, 1.0)])["seconds_per_round"] == 2.0
    row = combine_repeats([run(1.0, 0.1, 1.0), run(0.5, 0.1, 1.0, finished=False), run(2.0, 0.1, 1.0)])
    assert row["seconds_per_round"] == 2.0 and row["finished"] is False


def test_one_run_is_its_own_row() -> None:
    only = run(1.0, 0.1, 1.0)
    assert combine_repeats([only]) is only


def test_a_count_named_twice_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--workers", "10,10"])
    assert "name each count once" in capsys.readouterr().err
