"""Coordinator + 2 workers as real processes over gRPC on loopback."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from coordinator.rundir import load_checkpoint
from tests.conftest import tiny_config
from tests.integration.procs import finish, start_coordinator, start_worker, write_recipe


def test_coordinator_and_two_workers_complete_two_rounds(tmp_path: Path) -> None:
    cfg = tiny_config(run_dir=str(tmp_path / "runs"))
    recipe = write_recipe(cfg, tmp_path / "tiny.yaml")
    coord, address = start_coordinator(recipe, tmp_path)
    workers = [start_worker(address, tmp_path, i) for i in range(2)]
    for i, w in enumerate(workers):
        assert finish(w, 180, tmp_path / f"worker{i}.log") == 0, (tmp_path / f"worker{i}.log").read_text()
    assert finish(coord, 180, tmp_path / "coordinator.log") == 0
    # Not a terminal: the coordinator says as each round closes, in a plain line.
    lines = [line for line in (tmp_path / "coordinator.log").read_text().splitlines() if line.startswith("round ")]
    assert [line.split(" closed")[0] for line in lines] == ["round 1/2", "round 2/2"], lines
    assert all("2 workers" in line and "train loss" in line and "received per worker" in line for line in lines)

    run_dir = tmp_path / "runs" / "tiny"
    summary = json.loads((run_dir / "summary.json").read_text())
    results = [json.loads((tmp_path / f"worker{i}.json").read_text()) for i in range(2)]
    assert [r["rounds"] for r in results] == [2, 2]
    # After every round both replicas had the same digest as the coordinator's (each worker compared its
    # own with the one the coordinator sent, and a mismatch would have been a resync); the state moved
    # every round, and the last digest is the coordinator's final one.
    assert len(results[0]["state_hashes"]) == 2 and len(set(results[0]["state_hashes"])) == 2
    assert results[0]["state_hashes"] == results[1]["state_hashes"]
    assert results[0]["state_hashes"][-1] == summary["state_hash"]
    assert [r["resyncs"] for r in results] == [0, 0] and summary["resyncs"] == 0
    assert all(r["stale_updates"] == 0 for r in results)
    assert all(r["bytes_total"] == r["bytes_sent"] + r["bytes_received"] > 0 for r in results)

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rounds = [r for r in records if r["event"] == "round"]
    assert [r["round"] for r in rounds] == [0, 1]
    assert all(r["closed_by"] == "all" and len(r["workers"]) == 2 for r in rounds)
    for r in rounds:
        assert r["bytes_sent_per_worker"] > 0 and r["bytes_received_per_worker"] >= 0
        assert r["bytes_total_per_worker"] == r["bytes_sent_per_worker"] + r["bytes_received_per_worker"]
        assert r["downlink_bytes"] > 0 and r["resyncs"] == 0
    # Totals only grow; by round 1's close every worker had pulled round 0's aggregate.
    assert rounds[1]["bytes_total_per_worker"] > rounds[0]["bytes_total_per_worker"]
    assert rounds[1]["bytes_received_per_worker"] > 0
    initial_eval = rounds[0]["eval_loss"]
    assert all(r["final_eval_loss"] < initial_eval for r in results)

    assert summary["rounds"] == 2
    assert summary["bytes_sent_per_worker"] > 0 and summary["bytes_received_per_worker"] > 0
    assert summary["bytes_total_per_worker"] == summary["bytes_sent_per_worker"] + summary["bytes_received_per_worker"]
    assert set(summary["workers"]) == {"w0", "w1"}
    assert all(w["resyncs"] == 0 and w["bytes_total"] == w["bytes_sent"] + w["bytes_received"]
               for w in summary["workers"].values())
    ckpt = load_checkpoint(run_dir / "checkpoint.pt")
    assert ckpt["round"] == 2 and ckpt["replica"].digest() == summary["state_hash"]
    assert all(torch.equal(ckpt["params"][n], t) for n, t in ckpt["replica"].params.items())
