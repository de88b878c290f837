"""`lowband run` through a real local Ray instance with 2 worker actors."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

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
