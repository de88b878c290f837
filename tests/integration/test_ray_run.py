"""`lowband run` through a real local Ray instance: 2 worker actors and a coordinator over gRPC, the
all-gather and in-process transports, the DDP comparison, and a cluster too small for the run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from coordinator.malloc import allocator_settings, coordinator_env
from tests.conftest import tiny_config
from tests.integration.procs import LOWBAND, write_recipe


def _lowband_run(recipe: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    # A wide console: at rich's default of 80 columns the final table truncates run names and wraps headers.
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([*LOWBAND, "run", str(recipe), *extra], capture_output=True, text=True, timeout=300,
                          env=env)


def test_lowband_run_through_ray_writes_every_file(tmp_path: Path) -> None:
    cfg = tiny_config(name="raytiny", run_dir=str(tmp_path / "runs"))
    recipe = write_recipe(cfg, tmp_path / "raytiny.yaml")
    done = _lowband_run(recipe)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # Its output is not a terminal: progress comes as one plain line a closed round, as the coordinator prints.
    progress = [line for line in done.stdout.splitlines() if line.startswith("round ")]
    assert [line.split(" closed")[0] for line in progress] == ["round 1/2", "round 2/2"], done.stdout[-3000:]
    assert all("2 workers" in line and "eval loss" in line for line in progress)
    assert "lowband status 127.0.0.1:" in done.stdout  # where to ask for the live view

    run_dir = tmp_path / "runs" / "raytiny"
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "loss.png", "checkpoint.pt"):
        assert (run_dir / name).stat().st_size > 0, name
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds"] == 2
    assert summary["tokens"] == 2 * 10 * 8 * 32  # workers * steps * batch * block
    assert summary["transport"] == "grpc"
    sent, received = summary["bytes_sent_per_worker"], summary["bytes_received_per_worker"]
    assert sent > 0 and received > 0 and summary["bytes_total_per_worker"] == sent + received
    assert summary["final_eval_loss"] is not None
    # Every worker's replica matched the coordinator's after every round: no resyncs, equal digests, and the
    # last one is the coordinator's.
    results = summary["worker_results"]
    assert len(results) == 2 and results[0]["state_hashes"] == results[1]["state_hashes"]
    assert len(results[0]["state_hashes"]) == 2 and results[0]["state_hashes"][-1] == summary["state_hash"]
    assert summary["resyncs"] == 0 and all(r["resyncs"] == 0 for r in results)
    rounds = [r for r in _metrics(run_dir) if r["event"] == "round"]
    assert [r["round"] for r in rounds] == [0, 1]
    # The coordinator actor ran with its own allocator settings over the job's (coordinator/malloc.py).
    (start,) = [r for r in _metrics(run_dir) if r["event"] == "start"]
    assert start["allocator"] == allocator_settings({**os.environ, **coordinator_env()}), start
    assert start["allocator"]["GLIBC_TUNABLES"].endswith("glibc.malloc.tcache_count=0")
    for r in rounds:
        assert r["bytes_total_per_worker"] == r["bytes_sent_per_worker"] + r["bytes_received_per_worker"]
        assert r["bytes_sent_per_worker"] > 0
    assert "final results" in done.stdout and "eval loss" in done.stdout
    # The final table's bytes are split by kind and the split adds up to the totals.
    assert "protocol bytes" in done.stdout and "initial state" in done.stdout
    split = summary["traffic_per_worker"]
    assert split["protocol_sent"] > 0 and split["control_sent"] > 0 and split["state_sent"] > 0
    assert sum(split[f"{k}_sent"] for k in ("protocol", "control", "state")) == pytest.approx(sent)
    assert sum(split[f"{k}_received"] for k in ("protocol", "control", "state")) == pytest.approx(received)
    assert list(run_dir.glob("events.out.tfevents.*")), "no TensorBoard scalars in the run directory"


def _metrics(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("transport", ["inproc", "allgather"])
def test_lowband_run_honours_cluster_transport(tmp_path: Path, transport: str) -> None:
    cfg = tiny_config(name="via", run_dir=str(tmp_path / "runs"))
    recipe = write_recipe(cfg, tmp_path / "via.yaml")
    done = _lowband_run(recipe, "--set", f"cluster.transport={transport}")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    run_dir = tmp_path / "runs" / "via"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["transport"] == transport and summary["protocol"] == "diloco"
    assert summary["rounds"] == 2 and summary["bytes_total_per_worker"] > 0
    assert summary["bytes_total_per_worker"] == summary["bytes_sent_per_worker"] + summary["bytes_received_per_worker"]
    results = summary["worker_results"]
    assert len(results) == 2 and all(r["rounds"] == 2 for r in results)
    assert results[0]["state_hashes"] == results[1]["state_hashes"]
    assert results[0]["state_hashes"][-1] == summary["state_hash"] and summary["resyncs"] == 0
    if transport == "allgather":  # the ring model: each rank receives what it sends
        assert all(r["bytes_sent"] == r["bytes_received"] > 0 for r in results)
    evals = [r for r in _metrics(run_dir) if r.get("eval_loss") is not None]
    assert evals, "metrics.jsonl has no eval lines"
    assert summary["final_eval_loss"] < evals[0]["eval_loss"]
    assert (run_dir / "loss.png").stat().st_size > 0


def test_lowband_run_compare_ddp_runs_both_on_the_same_budget(tmp_path: Path) -> None:
    cfg = tiny_config(name="cmp", run_dir=str(tmp_path / "runs"))
    recipe = write_recipe(cfg, tmp_path / "cmp.yaml")
    done = _lowband_run(recipe, "--compare", "ddp")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    diloco = json.loads((tmp_path / "runs" / "cmp" / "summary.json").read_text())
    ddp = json.loads((tmp_path / "runs" / "cmp-ddp" / "summary.json").read_text())
    assert ddp["protocol"] == "ddp" and diloco["protocol"] == "diloco"
    assert ddp["tokens"] == diloco["tokens"]
    # DDP all-reduces gradients every step; DiLoCo sends once per 5 steps: DDP must send more.
    assert ddp["bytes_sent_per_worker"] > diloco["bytes_sent_per_worker"]
    assert ddp["bytes_total_per_worker"] > diloco["bytes_total_per_worker"]
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "loss.png", "checkpoint.pt"):
        assert (tmp_path / "runs" / "cmp-ddp" / name).stat().st_size > 0, name
    assert "cmp-ddp" in done.stdout and "ddp" in done.stdout
    assert (tmp_path / "runs" / "cmp" / "compare.png").stat().st_size > 0  # both runs in one plot


# A driver on a 1-CPU Ray cluster that cannot fit 2 workers of 2 CPUs each.
TOO_SMALL_CLUSTER = """
import json, sys
import ray
from deploy.launcher import LaunchError, run
from protocols.config import RunConfig

ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
try:
    run(RunConfig.model_validate(json.loads(sys.argv[1])))
except LaunchError as err:
    print("LaunchError:", err)
"""


@pytest.mark.parametrize("protocol", ["diloco", "ddp"])
def test_actors_ray_cannot_place_are_one_clear_error_not_a_hang(tmp_path: Path, protocol: str) -> None:
    cfg = tiny_config(name="toobig", run_dir=str(tmp_path / "runs"), protocol={"kind": protocol},
                      cluster__cpus_per_worker=2, cluster__actor_start_timeout_s=3)
    done = subprocess.run([sys.executable, "-c", TOO_SMALL_CLUSTER, cfg.model_dump_json()], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "LaunchError: Ray did not start the" in done.stdout
    assert "cluster.actor_start_timeout_s=3 s" in done.stdout
    assert "cluster.cpus_per_worker=2 CPUs and the Ray cluster has 1 CPUs" in done.stdout
    assert not (tmp_path / "runs" / "toobig" / "summary.json").exists()
