"""Fault injection with real processes: a worker killed by SIGKILL mid-round does not stop the run, and a
worker whose replica was corrupted notices by the digest and resyncs."""

from __future__ import annotations

import json
import signal
from pathlib import Path

from tests.conftest import tiny_config
from tests.integration.procs import finish, start_coordinator, start_worker, write_recipe


def test_run_completes_when_a_worker_is_killed_mid_round(tmp_path: Path) -> None:
    cluster = {"workers": 3, "min_workers": 2, "round_deadline_s": 30, "heartbeat_interval_s": 0.3,
               "heartbeat_timeout_s": 2.0}
    cfg = tiny_config(run_dir=str(tmp_path / "runs"), cluster=cluster)
    coord, address = start_coordinator(write_recipe(cfg, tmp_path / "tiny.yaml"), tmp_path)
    survivors = [start_worker(address, tmp_path, i) for i in range(2)]
    victim = start_worker(address, tmp_path, 2, "--crash-at-step", "3")

    assert finish(victim, 120, tmp_path / "worker2.log") == -signal.SIGKILL
    for i, w in enumerate(survivors):
        assert finish(w, 180, tmp_path / f"worker{i}.log") == 0, (tmp_path / f"worker{i}.log").read_text()
    assert finish(coord, 180, tmp_path / "coordinator.log") == 0

    results = [json.loads((tmp_path / f"worker{i}.json").read_text()) for i in range(2)]
    assert [r["rounds"] for r in results] == [2, 2]
    assert results[0]["state_hashes"] == results[1]["state_hashes"]
    metrics = [json.loads(line) for line in (tmp_path / "runs" / "tiny" / "metrics.jsonl").read_text().splitlines()]
    rounds = [r for r in metrics if r["event"] == "round"]
    # Both rounds closed with exactly the two survivors; the victim never reported.
    assert [len(r["workers"]) for r in rounds] == [2, 2]
    victim_ids = {w for w in ("w0", "w1", "w2")} - set(rounds[0]["workers"])
    assert len(victim_ids) == 1
    summary = json.loads((tmp_path / "runs" / "tiny" / "summary.json").read_text())
    assert summary["workers"][victim_ids.pop()]["alive"] is False


def test_a_worker_whose_replica_was_corrupted_notices_by_the_digest_and_resyncs(tmp_path: Path) -> None:
    cfg = tiny_config(run_dir=str(tmp_path / "runs"))
    coord, address = start_coordinator(write_recipe(cfg, tmp_path / "tiny.yaml"), tmp_path)
    healthy = start_worker(address, tmp_path, 0)
    corrupted = start_worker(address, tmp_path, 1, "--corrupt-replica-at-round", "0")
    for i, w in enumerate((healthy, corrupted)):
        assert finish(w, 180, tmp_path / f"worker{i}.log") == 0, (tmp_path / f"worker{i}.log").read_text()
    assert finish(coord, 180, tmp_path / "coordinator.log") == 0

    good, bad = (json.loads((tmp_path / f"worker{i}.json").read_text()) for i in range(2))
    summary = json.loads((tmp_path / "runs" / "tiny" / "summary.json").read_text())
    assert (good["resyncs"], bad["resyncs"]) == (0, 1)
    assert summary["resyncs"] == 1 and summary["workers"][bad["worker_id"]]["resyncs"] == 1
    assert summary["workers"][good["worker_id"]]["resyncs"] == 0
    # After the resync the corrupted worker holds the coordinator's replica again, every round.
    assert good["state_hashes"] == bad["state_hashes"] and len(good["state_hashes"]) == 2
    assert bad["state_hashes"][-1] == summary["state_hash"]
    assert [good["rounds"], bad["rounds"]] == [2, 2]
    # The whole replica moved once more, to the corrupted worker only.
    assert bad["bytes_received"] > good["bytes_received"]
    members = summary["workers"]
    assert members[bad["worker_id"]]["bytes_received"] > members[good["worker_id"]]["bytes_received"]
