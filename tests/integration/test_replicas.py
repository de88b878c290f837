"""Every worker holds the coordinator's replica after every round, and a corrupted replica heals.

A real CoordinatorServer in this process and two real `lowband worker` processes; w1 flips one
parameter of its replica after applying round 1 (`--corrupt-replica-at-round 1`). It must notice by
the digest, pull the whole replica once, and carry on to the end with everyone else's state.

The run is DiLoCo with an int8 downlink under EF21, so the replica is more than parameters: outer
Nesterov momentum and the downlink receiver's shift are in it, in its digest and in a resync.
"""

from __future__ import annotations

import pytest

from tests.conftest import tiny_config
from tests.integration.test_transports import GrpcRun, run_grpc
from worker.trainer import params_digest

ROUNDS = 3
CFG = tiny_config(
    protocol={"kind": "diloco", "inner_steps": 2, "downlink": {"codec": "int8", "error_feedback": "ef21"}},
    train={"steps": 2 * ROUNDS, "lr": 1e-2, "warmup_steps": 1, "eval_batches": 2, "eval_every_steps": 6},
    cluster={"workers": 2, "fold_order": "worker", "round_deadline_s": 120, "heartbeat_interval_s": 0.5},
)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> GrpcRun:
    # In join order: w0 healthy (it offers the initial state), then w1, which corrupts its replica.
    return run_grpc(CFG, tmp_path_factory.mktemp("replicas"), ((), ("--corrupt-replica-at-round", "1")),
                    in_order=True)


def test_a_healthy_workers_replica_is_the_coordinators_after_every_round(run: GrpcRun) -> None:
    want = [replica.digest() for replica in run.replicas]
    assert len(want) == ROUNDS and [r.round for r in run.replicas] == [1, 2, 3]
    final = run.replicas[-1]
    assert final.momentum and final.downlink_shift and final.outer_steps == ROUNDS  # all of it is compared
    assert run.summary["state_hash"] == want[-1]

    healthy = run.results[0]
    assert healthy["worker_id"] == "w0"
    assert (healthy["state_hashes"], healthy["rounds"], healthy["resyncs"]) == (want, ROUNDS, 0)
    assert healthy["param_hash"] == params_digest(final.params)
    assert run.summary["workers"]["w0"]["resyncs"] == 0


def test_a_corrupted_replica_is_noticed_resynced_once_and_the_worker_carries_on(run: GrpcRun) -> None:
    want = [replica.digest() for replica in run.replicas]
    healthy, corrupted = run.results
    assert corrupted["worker_id"] == "w1"
    # Noticed at round 1 by the digest, healed by one whole-replica pull, counted on both sides.
    assert corrupted["resyncs"] == 1
    assert run.summary["workers"]["w1"]["resyncs"] == 1 and run.summary["resyncs"] == 1
    # Carried on: every round done, every update folded, the last round's included.
    assert (corrupted["rounds"], corrupted["steps"], corrupted["stale_updates"]) == (ROUNDS, 2 * ROUNDS, 0)
    assert [record.workers for record in run.history] == [["w0", "w1"]] * ROUNDS
    # Its replica after every round (the corrupted one recorded after the resync) is everyone's.
    assert corrupted["state_hashes"] == healthy["state_hashes"] == want
    assert corrupted["state_hashes"][-1] == run.summary["state_hash"]
    assert corrupted["param_hash"] == healthy["param_hash"]
    assert corrupted["final_eval_loss"] == healthy["final_eval_loss"] is not None
    # The whole replica (parameters, momentum, shift) moved to w1 for the resync; apart from that, both
    # received the same aggregates (w1 seeded the same model as w0, so nothing was pulled at its start).
    whole = sum(t.numel() * t.element_size() for t in run.replicas[-1].to_tensors().values())
    extra = run.summary["workers"]["w1"]["bytes_received"] - run.summary["workers"]["w0"]["bytes_received"]
    assert whole <= extra < whole + 64 * 1024  # plus the stream's framing
