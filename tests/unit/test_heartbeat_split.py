"""bench/heartbeat_split.py: a slow probe heartbeat taken apart by the coordinator's trace."""

from bench.heartbeat_split import heartbeat_split, split_sample


def test_parts_add_up_to_the_latency_and_land_where_the_trace_says() -> None:
    parts = split_sample(100.0, 3.0, accepts=[99.0, 100.5, 101.9], handled=[(99.2, 99.3), (102.0, 102.1)])
    assert parts is not None
    assert abs(parts["to_accept"] - 1.9) < 1e-9  # the accept right before the handler, not the first after sending
    assert abs(parts["accept_to_handler"] - 0.1) < 1e-9
    assert abs(parts["handler"] - 0.1) < 1e-9
    assert abs(parts["after_handler"] - 0.9) < 1e-9
    assert abs(sum(parts.values()) - 3.0) < 1e-9


def test_a_sample_the_coordinator_never_handled_is_not_matched() -> None:
    assert split_sample(100.0, 1.0, accepts=[100.2], handled=[(102.0, 102.1)]) is None  # handled after the answer
    assert split_sample(100.0, 1.0, accepts=[], handled=[]) is None


def test_without_an_accept_since_the_send_the_wait_counts_before_the_handler() -> None:
    parts = split_sample(100.0, 1.0, accepts=[99.0], handled=[(100.6, 100.7)])
    assert parts is not None and abs(parts["to_accept"]) < 1e-9 and abs(parts["accept_to_handler"] - 0.6) < 1e-9


def test_only_samples_past_the_threshold_are_summed_and_the_slowest_is_named() -> None:
    samples = [(10.0, 0.1, True), (20.0, 2.0, True), (30.0, 1.0, True), (40.0, 5.0, False)]
    trace = {"accepts": [20.5, 30.1], "probe_handled": [[10.01, 10.02], [21.0, 21.1], [30.2, 30.3]]}
    got = heartbeat_split(samples, trace, slow_s=0.5)
    assert got["slow_samples"] == 2 and got["matched"] == 2  # the refused 5 s call is not a heartbeat answered
    assert got["slowest"]["latency_s"] == 2.0 and abs(got["slowest"]["to_accept"] - 0.5) < 1e-9
    assert abs(got["summed_over_slow"]["after_handler"] - (0.9 + 0.7)) < 1e-9
