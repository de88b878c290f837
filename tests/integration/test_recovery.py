"""Crash recovery with real processes and real signals: a coordinator killed by SIGKILL and restarted with
`--resume` continues the same run with the workers it had (not restarted); a worker killed by SIGKILL and
restarted with its `--name` rejoins as the same worker on the same shard; SIGTERM to the coordinator writes
the summary and exits non-zero, saying so; an update the dead coordinator acknowledged but never
checkpointed is pushed again to the resumed one."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any

import torch

from compression.payload import dense
from coordinator.checkpoint import load_checkpoint, state_digest
from coordinator.malloc import allocator_settings, coordinator_env
from coordinator.server import CoordinatorServer
from protocols.base import Update
from protocols.config import with_cluster
from tests.conftest import tiny_config
from tests.integration.procs import PROC_TOKEN, finish, start_coordinator, start_worker, wait_for, write_recipe
from worker.client import CoordinatorClient

# DiLoCo with an int8 downlink under EF14: outer momentum in the replica and a residual on the coordinator,
# so "bit-identical state" covers parameters, optimizer and error feedback. Folding in worker order makes
# the sums independent of arrival order.
PROTOCOL = {"kind": "diloco", "inner_steps": 4, "downlink": {"codec": "int8", "error_feedback": "ef14"}}
CLUSTER = {"workers": 2, "round_deadline_s": 120, "heartbeat_interval_s": 0.3, "heartbeat_timeout_s": 60,
           "fold_order": "worker"}


def rows(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def rounds_logged(run_dir: Path) -> list[int]:
    return [r["round"] for r in rows(run_dir) if r["event"] == "round"]


def test_a_coordinator_killed_after_round_k_resumes_and_the_same_workers_finish_the_run(tmp_path: Path) -> None:
    cfg = tiny_config(run_dir=str(tmp_path / "runs"), protocol=PROTOCOL, cluster=CLUSTER, train__steps=20)
    assert cfg.rounds == 5
    run_dir = tmp_path / "runs" / "tiny"
    recipe = write_recipe(cfg, tmp_path / "tiny.yaml")
    coord, address = start_coordinator(recipe, tmp_path)
    # A step delay keeps rounds long enough to kill the coordinator between round 1 and the end of the run.
    workers = [start_worker(address, tmp_path, i, "--step-delay", "0.25", "--retry-for", "120") for i in range(2)]

    wait_for(lambda: 1 in rounds_logged(run_dir) or coord.poll() is not None, 120, "round 1 to close")
    coord.send_signal(signal.SIGKILL)
    assert coord.wait(timeout=30) == -signal.SIGKILL
    shutil.copy(run_dir / "checkpoint.pt", tmp_path / "at_kill.pt")  # the dead process's last word
    at_kill = load_checkpoint(tmp_path / "at_kill.pt")
    k = at_kill["round"]
    assert 2 <= k < cfg.rounds, f"killed at round {k}: the run must still have rounds left"
    assert all(w.poll() is None for w in workers), "a worker died with the coordinator"

    (tmp_path / "resumed").mkdir()
    resumed, _ = start_coordinator(recipe, tmp_path / "resumed", "--bind", address, "--resume", str(run_dir))
    for i, w in enumerate(workers):  # the very same worker processes, never restarted
        assert finish(w, 240, tmp_path / f"worker{i}.log") == 0, (tmp_path / f"worker{i}.log").read_text()[-3000:]
    assert finish(resumed, 120, tmp_path / "resumed" / "coordinator.log") == 0

    logged = rows(run_dir)
    # Every round exactly once, one run id throughout.
    assert rounds_logged(run_dir) == list(range(cfg.rounds))
    assert {r["run_id"] for r in logged if r["event"] in ("start", "round", "resume")} == {at_kill["run_id"]}
    # `lowband coordinator` started itself again with the allocator settings only a starting process takes.
    started_with = allocator_settings({**os.environ, **coordinator_env()})
    assert started_with["GLIBC_TUNABLES"].endswith("glibc.malloc.tcache_count=0")
    assert [r["allocator"] for r in logged if r["event"] == "start"] == [started_with] * 2
    # The resumed coordinator loaded exactly the state the killed one had checkpointed.
    (resume,) = [r for r in logged if r["event"] == "resume"]
    assert resume["round"] == k
    assert resume["replica_digest"] == at_kill["replica"].digest()
    assert resume["aggregator_state_digest"] == state_digest(at_kill["aggregator_state"])
    assert resume["downlink_state_digest"] == state_digest(at_kill["downlink_state"])
    assert at_kill["downlink_state"] is not None and at_kill["replica"].momentum  # there was state to lose
    # The rounds after the restart were trained by both workers, and every replica ended equal.
    assert all(r["workers"] == ["w0", "w1"] for r in logged if r["event"] == "round")
    results = [json.loads((tmp_path / f"worker{i}.json").read_text()) for i in range(2)]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["run_id"] == at_kill["run_id"] and summary["rounds"] == cfg.rounds
    assert [r["state_hashes"][-1] for r in results] == [summary["state_hash"]] * 2
    assert summary["tokens"] == cfg.train.steps * 2 * cfg.data.batch_size * cfg.model.block_size  # none lost
    assert {w: m["joins"] for w, m in summary["workers"].items()} == {"w0": 1, "w1": 1}  # reconnected, no rejoin

    # The same run without the crash ends in the bit-identical replica: the restart changed nothing.
    reference = tmp_path / "reference"
    reference.mkdir()
    ref_cfg = cfg.model_copy(update={"run_dir": str(reference / "runs")})
    ref_coord, ref_address = start_coordinator(write_recipe(ref_cfg, reference / "tiny.yaml"), reference)
    ref_workers = [start_worker(ref_address, reference, i) for i in range(2)]
    for i, w in enumerate(ref_workers):
        assert finish(w, 240, reference / f"worker{i}.log") == 0, (reference / f"worker{i}.log").read_text()[-3000:]
    assert finish(ref_coord, 120, reference / "coordinator.log") == 0
    ref_summary = json.loads((reference / "runs" / "tiny" / "summary.json").read_text())
    assert ref_summary["state_hash"] == summary["state_hash"]
    assert ref_summary["final_eval_loss"] == summary["final_eval_loss"]


def test_a_worker_killed_mid_round_rejoins_under_its_name_on_its_shard(tmp_path: Path) -> None:
    cfg = tiny_config(run_dir=str(tmp_path / "runs"), protocol=PROTOCOL, cluster=CLUSTER, train__steps=16)
    run_dir = tmp_path / "runs" / "tiny"
    coord, address = start_coordinator(write_recipe(cfg, tmp_path / "tiny.yaml"), tmp_path)
    survivor = start_worker(address, tmp_path, 0, "--name", "alpha")
    wait_for(lambda: any(r["event"] == "join" for r in rows(run_dir)), 60, "alpha to join")
    victim = start_worker(address, tmp_path, 1, "--name", "beta", "--crash-at-step", "6")  # round 1 of 4
    assert finish(victim, 120, tmp_path / "worker1.log") == -signal.SIGKILL
    restarted = start_worker(address, tmp_path, 2, "--name", "beta")
    for i, w in ((0, survivor), (2, restarted)):
        assert finish(w, 180, tmp_path / f"worker{i}.log") == 0, (tmp_path / f"worker{i}.log").read_text()[-3000:]
    assert finish(coord, 120, tmp_path / "coordinator.log") == 0

    joins = [(r["worker"], r["index"], r["joins"]) for r in rows(run_dir) if r["event"] == "join"]
    assert joins == [("alpha", 0, 1), ("beta", 1, 1), ("beta", 1, 2)]  # the same id and shard index
    assert rounds_logged(run_dir) == list(range(cfg.rounds))
    assert all(r["workers"] == ["alpha", "beta"] for r in rows(run_dir) if r["event"] == "round")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert sorted(summary["workers"]) == ["alpha", "beta"]  # no third worker
    assert summary["workers"]["beta"]["index"] == 1 and summary["workers"]["beta"]["joins"] == 2
    again = json.loads((tmp_path / "worker2.json").read_text())
    # The restarted process trained the rounds left, and its step counter (so its LR schedule) went on from
    # the global step: its final eval is at the run's last step, not at the steps it took itself.
    assert again["worker_id"] == "beta" and again["steps"] < cfg.train.steps
    assert again["evals"][-1]["step"] == cfg.train.steps


def test_sigterm_to_the_coordinator_writes_the_summary_and_exits_non_zero_saying_so(tmp_path: Path) -> None:
    cfg = tiny_config(run_dir=str(tmp_path / "runs"), protocol=PROTOCOL, cluster=CLUSTER, train__steps=40)
    run_dir = tmp_path / "runs" / "tiny"
    coord, address = start_coordinator(write_recipe(cfg, tmp_path / "tiny.yaml"), tmp_path)
    for i in range(2):
        start_worker(address, tmp_path, i, "--step-delay", "0.1")
    wait_for(lambda: 0 in rounds_logged(run_dir) or coord.poll() is not None, 120, "round 0 to close")
    coord.send_signal(signal.SIGTERM)
    assert finish(coord, 60, tmp_path / "coordinator.log") == 128 + signal.SIGTERM
    log = (tmp_path / "coordinator.log").read_text()
    assert "stopped by SIGTERM" in log and f"--resume {run_dir}" in log
    summary = json.loads((run_dir / "summary.json").read_text())
    ckpt = load_checkpoint(run_dir / "checkpoint.pt")
    assert summary["stopped_by"] == "SIGTERM" and 1 <= summary["rounds"] < cfg.rounds
    # The summary, the checkpoint and the metrics agree on the rounds recorded: nothing half-written.
    assert summary["rounds"] == ckpt["round"] and rounds_logged(run_dir) == list(range(ckpt["round"]))


def test_an_update_acknowledged_after_the_last_checkpoint_is_pushed_again_to_the_resumed_coordinator(
        tmp_path: Path) -> None:
    """The clients run in this process and the resumed coordinator too, so the test can look inside it: w0's
    round-1 update is acknowledged, then the coordinator process is killed before round 1 closes (it was
    never checkpointed) while w0 waits for the round. w0's client sees the connection fail, pushes the update
    again to the resumed coordinator, which folds it once, and round 1 closes."""
    cfg = tiny_config(run_dir=str(tmp_path / "runs"), protocol=PROTOCOL, cluster=CLUSTER, train__steps=12)
    run_dir = tmp_path / "runs" / "tiny"
    first, address = start_coordinator(write_recipe(cfg, tmp_path / "tiny.yaml"), tmp_path)
    clients = [CoordinatorClient(address, token=PROC_TOKEN, retry_for_s=120) for _ in range(2)]

    def push(c: CoordinatorClient, r: int, value: float) -> None:
        c.push(r, Update({"w": dense(torch.full((3, 2), value))}), {"tokens": 10.0})

    try:
        for c in clients:
            c.join("host")
        assert clients[0].offer_state({"w": torch.ones(3, 2)})
        push(clients[0], 0, 0.1)
        push(clients[1], 0, 0.2)
        wait_for(lambda: rounds_logged(run_dir) == [0], 60, "round 0 to be recorded")
        push(clients[0], 1, 0.3)  # acknowledged; only the killed process will ever have held it
        waited: list[Any] = []

        def wait_for_round_1() -> None:
            """As a worker's `status` does: wait again while the round has not closed (a resumed coordinator
            answers "waiting for workers" first; the push is repeated on a wait after the reconnect)."""
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                info = clients[0].wait_round(1, 30.0)
                if info.round > 1:
                    waited.append(info)
                    return

        waiting = threading.Thread(target=wait_for_round_1, daemon=True)
        waiting.start()  # w0 waits for round 1 to close, as a worker does after its push
        first.send_signal(signal.SIGKILL)
        assert first.wait(timeout=30) == -signal.SIGKILL
        tokened = with_cluster(cfg, token=PROC_TOKEN)
        second = CoordinatorServer(tokened, bind=address, run_dir=run_dir, resume=run_dir).start()
        try:
            assert second.state.round == 1 and not second.state.folded
            wait_for(lambda: clients[0].reconnects > 0, 60, "w0's client to see the connection fail")
            clients[1].heartbeat(8, None, None)  # w1 is back too: the round reopens
            wait_for(lambda: "w0" in second.state.folded.get(1, set()), 60, "w0's update to be pushed again")
            push(clients[1], 1, 0.4)
            waiting.join(timeout=60)
            assert [info.round for info in waited] == [2] and second.state.round == 2
            assert second.state.members["w0"].tokens == 20  # its round-1 update counted once
            second.recorder.flush()  # rounds are recorded off the state lock
            assert rounds_logged(run_dir) == [0, 1]
        finally:
            second.stop(grace=0)
    finally:
        for c in clients:
            c.close()
