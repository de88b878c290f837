"""A 4-worker CO2 run over gRPC on an emulated 50 Mbit/s link: real coordinator and worker processes."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import tiny_config
from tests.integration.procs import finish, start_coordinator, start_worker, write_recipe


def test_four_worker_co2_run_on_an_emulated_slow_link_completes_and_learns(tmp_path: Path) -> None:
    rounds = 5
    cfg = tiny_config(
        name="co2", run_dir=str(tmp_path / "runs"),
        protocol={"kind": "diloco", "inner_steps": 2, "outer_lr": 1.0, "outer_momentum": 0.5,
                  "overlap": {"enabled": True}},
        train={"steps": 2 * rounds, "lr": 1e-2, "warmup_steps": 1, "eval_batches": 2, "eval_every_steps": 2},
        cluster={"workers": 4, "round_deadline_s": 120, "heartbeat_interval_s": 0.5},
        link={"bandwidth_mbps": 50, "latency_ms": 5},
    )
    coord, address = start_coordinator(write_recipe(cfg, tmp_path / "co2.yaml"), tmp_path)
    workers = [start_worker(address, tmp_path, i) for i in range(4)]
    for i, w in enumerate(workers):
        assert finish(w, 240, tmp_path / f"worker{i}.log") == 0, (tmp_path / f"worker{i}.log").read_text()
    assert finish(coord, 240, tmp_path / "coordinator.log") == 0

    summary = json.loads((tmp_path / "runs" / "co2" / "summary.json").read_text())
    results = [json.loads((tmp_path / f"worker{i}.json").read_text()) for i in range(4)]
    assert summary["rounds"] == rounds
    for r in results:
        assert r["rounds"] == rounds and (r["resyncs"], r["stale_updates"]) == (0, 0)
        assert r["state_hashes"] == results[0]["state_hashes"]
        assert r["state_hashes"][-1] == summary["state_hash"]
        assert len(r["compute_seconds"]) == len(r["blocked_seconds"]) == rounds
        evals = [point["eval_loss"] for point in r["evals"]]
        assert evals[1] == evals[0]  # the first round's aggregate only comes back at the end of round 1
        assert r["final_eval_loss"] < evals[0] - 0.1
