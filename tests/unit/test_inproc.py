"""`deploy.inproc.run_inproc`: the coordinator's state machine and worker threads in this process (no
sockets, no processes), on the tiny GPT: real training for DiLoCo, SparseLoCo and EControl.

Each run is 2 workers, 3 rounds of 2 inner steps, `cluster.fold_order: worker` (reproducible sums).
"""

from __future__ import annotations

import functools
from typing import Any

import pytest

from deploy.inproc import run_inproc
from protocols.config import RunConfig
from tests.conftest import tiny_config
from worker.data import load_corpus
from worker.faults import Faults
from worker.loop import WorkerResult
from worker.model import GPT

WORKERS, ROUNDS, H = 2, 3, 2
KINDS = ("diloco", "sparseloco", "econtrol")


def config(kind: str) -> RunConfig:
    return tiny_config(
        protocol={"kind": kind, "inner_steps": H},
        train={"steps": ROUNDS * H, "lr": 1e-2, "warmup_steps": 1, "eval_batches": 2, "eval_every_steps": ROUNDS * H},
        cluster={"workers": WORKERS, "transport": "inproc", "fold_order": "worker"},
    )


@functools.cache
def run(kind: str) -> tuple[dict[str, Any], list[WorkerResult]]:
    """One fault-free run per kind, shared by the tests that only read it."""
    return run_inproc(config(kind))


def dense_model_bytes() -> int:
    cfg = config("diloco")
    vocab = load_corpus(cfg.data.eval_fraction, cfg.data.max_chars).tokenizer.vocab_size
    return sum(p.numel() * p.element_size() for p in GPT(cfg.model, vocab).parameters())


@pytest.mark.parametrize("kind", KINDS)
def test_a_run_trains_and_every_replica_ends_as_the_coordinators(kind: str) -> None:
    summary, results = run(kind)
    assert summary["protocol"] == kind and summary["rounds"] == ROUNDS and summary["resyncs"] == 0
    assert sorted(r.worker_id for r in results) == ["w0", "w1"]
    for r in results:
        assert (r.rounds, r.steps, r.resyncs, r.stale_updates) == (ROUNDS, ROUNDS * H, 0, 0)
        assert len(r.state_hashes) == ROUNDS and r.state_hashes[-1] == summary["state_hash"]
        assert r.state_hashes == results[0].state_hashes  # and after every round before it
        assert r.param_hash == results[0].param_hash
        # Loss goes down: the final eval (of the shared replica) against the eval at round 0.
        assert [p["round"] for p in r.evals] == [0, ROUNDS]
        assert r.final_eval_loss is not None and r.final_eval_loss < r.evals[0]["eval_loss"] - 0.1
        assert r.bytes_total == r.bytes_sent + r.bytes_received > 0
    assert summary["final_eval_loss"] == pytest.approx(results[0].final_eval_loss)
    assert summary["tokens"] == WORKERS * ROUNDS * H * 8 * 32


def test_sparseloco_moves_far_less_than_a_dense_model_per_round_both_ways() -> None:
    dense = dense_model_bytes()
    summary, results = run("sparseloco")
    for worker_id, counted in summary["workers"].items():
        # What the coordinator sent down / took in from each worker: the sparse aggregates and updates (and
        # w0's one upload of the initial model).
        offered = dense if worker_id == "w0" else 0
        assert 0 < counted["bytes_received"] < 0.1 * ROUNDS * dense, worker_id
        assert 0 < counted["bytes_sent"] - offered < 0.1 * ROUNDS * dense, worker_id
    for r in results:
        # w0 also uploaded the initial model once; no worker pulled a whole replica.
        offered = dense if r.worker_id == "w0" else 0
        assert 0 < r.bytes_received < 0.1 * ROUNDS * dense, r.worker_id
        assert 0 < r.bytes_sent - offered < 0.1 * ROUNDS * dense, r.worker_id
    # DiLoCo's dense downlink, for scale: one float32 model per round to every worker.
    diloco, _ = run("diloco")
    assert all(w["bytes_received"] >= ROUNDS * dense for w in diloco["workers"].values())


def test_two_identical_runs_are_bit_identical() -> None:
    first_summary, first = run("econtrol")  # per-worker shifts and error feedback: state across rounds
    second_summary, second = run_inproc(config("econtrol"))
    assert second_summary["state_hash"] == first_summary["state_hash"]
    assert [r.state_hashes for r in second] == [r.state_hashes for r in first]
    assert [r.param_hash for r in second] == [r.param_hash for r in first]
    assert [r.evals for r in second] == [r.evals for r in first]


@pytest.mark.parametrize("corrupted", [0, 1])  # w0 offered the initial state; w1 did not
def test_a_corrupted_replica_resyncs_once_and_ends_where_a_clean_run_does(corrupted: int) -> None:
    faults = [Faults()] * WORKERS
    faults[corrupted] = Faults(corrupt_replica_at_round=1)
    summary, results = run_inproc(config("diloco"), faults=faults)
    clean_summary, clean = run("diloco")
    by_id = {r.worker_id: r for r in results}
    bad, good = by_id[f"w{corrupted}"], by_id[f"w{1 - corrupted}"]
    assert (bad.resyncs, good.resyncs) == (1, 0)
    assert summary["resyncs"] == 1 and summary["workers"][bad.worker_id]["resyncs"] == 1
    assert (bad.rounds, bad.steps, bad.stale_updates) == (ROUNDS, ROUNDS * H, 0)
    # Healed before the round was recorded, and nothing else changed: the clean run's states, every round.
    assert bad.state_hashes == good.state_hashes == clean[0].state_hashes
    assert bad.state_hashes[-1] == summary["state_hash"] == clean_summary["state_hash"]
    assert bad.final_eval_loss == good.final_eval_loss == clean[0].final_eval_loss
