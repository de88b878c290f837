"""`lowband run` through a real local Ray instance with 2 worker actors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import tiny_config
from tests.integration.procs import LOWBAND, write_recipe


def test_lowband_run_through_ray_writes_every_file(tmp_path: Path) -> None:
    cfg = tiny_config(name="raytiny", run_dir=str(tmp_path / "runs"))
    recipe = write_recipe(cfg, tmp_path / "raytiny.yaml")
    done = subprocess.run([*LOWBAND, "run", str(recipe)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    run_dir = tmp_path / "runs" / "raytiny"
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "loss.png", "checkpoint.pt"):
        assert (run_dir / name).stat().st_size > 0, name
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds"] == 2
    assert summary["tokens"] == 2 * 10 * 8 * 32  # workers * steps * batch * block
    assert summary["bytes_up_per_worker"] > 0 and summary["bytes_down_per_worker"] > 0
    assert summary["final_eval_loss"] is not None
    results = summary["worker_results"]
    assert len(results) == 2 and results[0]["state_hashes"] == results[1]["state_hashes"]
    assert "final results" in done.stdout and "eval loss" in done.stdout


def test_lowband_run_compare_ddp_runs_both_on_the_same_budget(tmp_path: Path) -> None:
    cfg = tiny_config(name="cmp", run_dir=str(tmp_path / "runs"))
    recipe = write_recipe(cfg, tmp_path / "cmp.yaml")
    done = subprocess.run([*LOWBAND, "run", str(recipe), "--compare", "ddp"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    diloco = json.loads((tmp_path / "runs" / "cmp" / "summary.json").read_text())
    ddp = json.loads((tmp_path / "runs" / "cmp-ddp" / "summary.json").read_text())
    assert ddp["protocol"] == "ddp" and diloco["protocol"] == "diloco"
    assert ddp["tokens"] == diloco["tokens"]
    # DDP all-reduces gradients every step; DiLoCo sends once per 5 steps: DDP must send more.
    assert ddp["bytes_up_per_worker"] > diloco["bytes_up_per_worker"]
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "loss.png", "checkpoint.pt"):
        assert (tmp_path / "runs" / "cmp-ddp" / name).stat().st_size > 0, name
    assert "cmp-ddp" in done.stdout and "ddp" in done.stdout


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
