"""Coordinator + 2 workers as real processes over gRPC on loopback."""

from __future__ import annotations

import json
from pathlib import Path

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

    results = [json.loads((tmp_path / f"worker{i}.json").read_text()) for i in range(2)]
    assert [r["rounds"] for r in results] == [2, 2]
    # Every pull (rounds 0, 1 and the final state) gave both workers bit-identical global parameters.
    assert len(results[0]["state_hashes"]) == 3
    assert results[0]["state_hashes"] == results[1]["state_hashes"]
    assert len(set(results[0]["state_hashes"])) == 3  # and the state changed every round

    run_dir = tmp_path / "runs" / "tiny"
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rounds = [r for r in rounds if r["event"] == "round"]
    assert [r["round"] for r in rounds] == [0, 1]
    assert all(r["closed_by"] == "all" and len(r["workers"]) == 2 for r in rounds)
    initial_eval = rounds[0]["eval_loss"]
    assert all(r["final_eval_loss"] < initial_eval for r in results)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds"] == 2
    assert summary["bytes_up_per_worker"] > 0
    assert (run_dir / "checkpoint.pt").exists()
