"""bench.transport's helpers on a real coordinator and real gloo ranks, at 1 MiB (a few seconds).

What is checked is what the table's numbers rest on: the state really has the size named, the rows'
rates follow from their own byte counts and times, and both contenders complete their real protocol
(the gRPC driver refuses a pull that is not of the round just closed; a gloo rank refuses a wrong sum).
"""

from __future__ import annotations

import argparse
from typing import Any

import pytest
import torch

from bench.transport import MIB, bench_gloo, bench_grpc, make_state, parse_sizes
from bench.transport_rounds import bench_rounds


def test_state_has_the_named_size_in_a_few_fp32_tensors() -> None:
    state = make_state(16)
    assert len(state) > 1
    assert all(t.dtype == torch.float32 for t in state.values())
    assert sum(t.numel() * t.element_size() for t in state.values()) == 16 * MIB
    with pytest.raises(ValueError, match="positive whole number of MiB"):
        make_state(0)


def test_sizes_parse_or_name_the_problem() -> None:
    assert parse_sizes("16, 256") == [16, 256]
    for bad in ("", "16,x", "0", "-4", "1.5"):
        with pytest.raises(argparse.ArgumentTypeError, match="--sizes"):
            parse_sizes(bad)


def _check_row(row: dict[str, Any], contender: str) -> None:
    assert row["contender"] == contender
    assert 0 < row["seconds_min"] <= row["seconds"] <= row["seconds_max"]
    assert row["gb_per_s"] == pytest.approx(1 * MIB / row["seconds"] / 1e9)


def test_grpc_push_and_pull_rows_through_a_real_coordinator() -> None:
    push, pull = bench_grpc(1, warmup=1, repeat=2, chunk_bytes=256 * 1024, allocator="default")
    _check_row(push, "grpc-push-1mb")
    _check_row(pull, "grpc-pull-1mb")
    assert push["chunk_mib"] == 0.25
    assert push["seconds_with_outer_step"] > 0


def test_gloo_rows_from_two_ranks() -> None:
    (row,) = bench_gloo([1], warmup=1, repeat=2, allocator="default")
    _check_row(row, "gloo-allreduce-1mb")
    assert row["world_size"] == 2


def test_rounds_rows_run_one_protocol_over_grpc_and_allgather_through_the_round_loop() -> None:
    rows = bench_rounds(rounds=2, warmup=1, n_embd=32, n_layer=1)
    assert [r["contender"] for r in rows] == ["rounds-grpc", "rounds-allgather"]
    grpc, allgather = rows
    assert grpc["parameters"] == allgather["parameters"] > 0
    for row in rows:
        assert 0 < row["seconds_min"] <= row["seconds"] <= row["seconds_max"]
        assert row["bytes_sent_per_round"] > 0 and row["bytes_received_per_round"] > 0
        both = row["bytes_sent_per_round"] + row["bytes_received_per_round"]
        assert row["bytes_total_per_round"] == pytest.approx(both)
    assert grpc["seconds_vs_grpc"] == 1.0
    assert allgather["seconds_vs_grpc"] == allgather["seconds"] / grpc["seconds"]
    # The ring receives as much as it sends; the star's worker receives the dense aggregate every round.
    assert allgather["bytes_sent_per_round"] == allgather["bytes_received_per_round"]
    assert grpc["bytes_received_per_round"] >= 4 * grpc["parameters"]
