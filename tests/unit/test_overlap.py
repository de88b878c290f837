"""CO2 overlap through the round loop, in process: every replica stays the coordinator's, bit for bit, while
each round's exchange runs under the next round's training; the coordinator holds an early update back."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from compression import registry
from compression.payload import dense
from coordinator.state import CoordinatorState
from deploy.inproc import run_inproc
from deploy.report import plot_utilization
from protocols.base import Update
from protocols.config import PROTOCOL_VERSION
from protocols.refusals import Rejected, is_early, is_stale
from protocols.registry import build_protocol
from protocols.settings import ConfigError
from tests.conftest import tiny_config
from worker.loop import WorkerResult

ROUNDS = 5
CASES: dict[str, dict[str, Any]] = {
    "diloco": {"kind": "diloco", "inner_steps": 2, "outer_lr": 1.0, "outer_momentum": 0.5},
    "sparseloco": {"kind": "sparseloco", "inner_steps": 2, "compression": {"chunk": 256, "density": 0.0625}},
    "econtrol": {"kind": "econtrol", "inner_steps": 2, "compression": {"chunk": 256}},
}


def _config(case: str, overlap: bool, eager: bool = False) -> Any:
    return tiny_config(
        protocol={**CASES[case], "overlap": {"enabled": overlap, "eager": eager}},
        train={"steps": 2 * ROUNDS, "lr": 1e-2, "warmup_steps": 1, "eval_batches": 2, "eval_every_steps": 2},
        cluster={"workers": 2, "fold_order": "worker"},
    )


def _run(case: str, overlap: bool, eager: bool = False) -> tuple[dict[str, Any], list[WorkerResult]]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_inproc(_config(case, overlap, eager))
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("case", list(CASES))
def test_overlapped_replicas_are_the_coordinators_and_the_loss_falls(case: str) -> None:
    summary, results = _run(case, overlap=True)
    assert build_protocol(_config(case, True)).overlapped
    assert summary["rounds"] == ROUNDS
    for r in results:
        assert r.rounds == ROUNDS and len(r.state_hashes) == ROUNDS
        assert (r.resyncs, r.stale_updates) == (0, 0)
        assert r.state_hashes[-1] == summary["state_hash"]
        assert r.state_hashes == results[0].state_hashes
        assert len(r.compute_seconds) == len(r.blocked_seconds) == ROUNDS
    evals = [point["eval_loss"] for point in results[0].evals]
    # Round 1 trains from the initial model again: no aggregate has come back yet (the paper's first round).
    assert evals[1] == evals[0]
    assert evals[-1] < evals[0] - 0.1


def test_overlap_changes_the_trajectory_but_not_the_bytes_per_round() -> None:
    (sync, sync_results), (co2, co2_results) = _run("diloco", overlap=False), _run("diloco", overlap=True)
    assert sync["state_hash"] != co2["state_hash"]  # a one-round-stale outer step is another algorithm
    for a, b in zip(sync_results, co2_results, strict=True):
        assert a.rounds == b.rounds
        # The same updates and aggregates cross the wire, only at other times.
        assert abs(a.bytes_received - b.bytes_received) <= 0.01 * a.bytes_received


def test_an_update_for_a_round_not_yet_open_is_refused_as_early_and_one_for_a_closed_round_as_stale() -> None:
    cfg = _config("diloco", overlap=True)
    # Three members, w2 silent from the start: rounds close with w0 and w1 (the quorum) once it lapses.
    cluster = cfg.cluster.model_copy(update={"workers": 3, "min_workers": 2, "heartbeat_timeout_s": 5.0})
    now = [0.0]
    state = CoordinatorState(cfg.model_copy(update={"cluster": cluster}), build_protocol(cfg), clock=lambda: now[0])
    for name in ("w0", "w1", "w2"):
        state.join("test", "", PROTOCOL_VERSION, name)
    params = {"w": torch.zeros(3)}
    state.offer_initial_state("w0", "", {"w": dense(params["w"])})
    now[0] = 10.0
    state.heartbeat("w0", "", 0, None, None)
    state.heartbeat("w1", "", 0, None, None)
    state.tick()  # w2 lapsed
    update = Update({"w": dense(torch.full((3,), 0.1))})
    state.submit("w0", "", 0, update, {}, 0)
    with pytest.raises(Rejected) as refused:
        state.submit("w0", "", 1, update, {}, 0)  # ran ahead: round 0 waits for w1
    assert is_early(refused.value) and "still at round 0" in refused.value.message
    state.submit("w1", "", 0, update, {}, 0)
    assert state.submit("w0", "", 1, update, {}, 0) == 1  # round 1 is open now
    assert state.submit("w1", "", 0, update, {}, 0) == 0  # a retry of a folded push: acknowledged, folded once
    with pytest.raises(Rejected) as late:
        state.submit("w2", "", 0, update, {}, 0)  # round 0 has closed without it: too late, not early
    assert is_stale(late.value) and not is_early(late.value)


@pytest.mark.parametrize("case", ["diloco", "sparseloco"])
def test_eager_workers_share_the_replica_but_start_from_their_own_fresh_update(case: str) -> None:
    (co2, _), (eager, eager_results) = _run(case, overlap=True), _run(case, overlap=True, eager=True)
    for r in eager_results:  # every replica is still the coordinator's, checked by digest every round
        assert (r.resyncs, r.stale_updates) == (0, 0) and r.state_hashes == eager_results[0].state_hashes
        assert r.state_hashes[-1] == eager["state_hash"]
    # Round 1 starts from the eager nudge, not the untouched replica (the updates differ from then on).
    assert eager["state_hash"] != co2["state_hash"]
    evals = [point["eval_loss"] for point in eager_results[0].evals]
    assert evals[1] != evals[0] and evals[-1] < evals[0] - 0.1


def test_eager_needs_overlap_and_an_averaged_aggregate() -> None:
    with pytest.raises(ConfigError, match=r"overlap\.eager needs overlap\.enabled"):
        _config("diloco", overlap=False, eager=True)
    with pytest.raises(ConfigError, match=r"overlap\.eager needs an aggregate that averages"):
        _config("econtrol", overlap=True, eager=True)


def test_every_round_records_its_span_on_each_worker_and_the_coordinator_logs_it(tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _, results = run_inproc(_config("diloco", overlap=True), run_dir=tmp_path)
    finally:
        torch.set_num_threads(threads)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    rounds = [row for row in rows if row["event"] == "round"]
    assert len(rounds) == ROUNDS
    for r in results:
        assert [int(span["round"]) for span in r.spans] == list(range(ROUNDS))
        assert r.train_s >= sum(span["wall_s"] for span in r.spans)
        for span, row in zip(r.spans, rounds, strict=True):
            assert span["compute_s"] + span["blocked_s"] <= span["wall_s"]
            assert row["utilization_per_worker"][r.worker_id] == span["utilization"]
    for row in rounds:
        assert row["compute_utilization"] == pytest.approx(
            sum(row["utilization_per_worker"].values()) / len(row["utilization_per_worker"]))
    assert plot_utilization(tmp_path) == tmp_path / "utilization.png"


def test_a_refused_update_goes_back_into_the_error_feedback_so_nothing_is_lost() -> None:
    """Overlapped, the next round's update is made before a refusal is known; `withdraw` then puts the refused
    messages back into the error feedback: delivered + residual == every pseudo-gradient made."""
    cfg = tiny_config(protocol={"kind": "diloco", "inner_steps": 2, "overlap": {"enabled": True},
                                "compression": {"codec": "topk", "density": 0.1, "error_feedback": "ef14"}})
    protocol = build_protocol(cfg)
    replica = {"w": torch.zeros(200)}
    gen = torch.Generator().manual_seed(0)
    locals_ = [{"w": torch.randn(200, generator=gen)} for _ in range(2)]
    state = protocol.init_worker_state(replica)
    refused, state = protocol.make_update(locals_[0], replica, state)
    delivered, state = protocol.make_update(locals_[1], replica, state)
    state = protocol.withdraw(refused, state)
    made = sum(replica["w"] - local["w"] for local in locals_)  # pseudo-gradients are replica - local
    residual = state.residual("w")
    assert residual is not None
    torch.testing.assert_close(registry.decode(delivered.payloads["w"]) + residual, made)
