"""`cluster.device: cuda` where there is no GPU is one clear error, from the real commands: `lowband run` stops
before any actor starts, a bare `lowband worker` stops after it joined and received the config."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch

from tests.conftest import tiny_config
from tests.integration.procs import LOWBAND, finish, start_coordinator, start_worker, write_recipe

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="asserts what happens on a machine without a GPU")
NO_GPU = "cluster.device is 'cuda' but"


def test_lowband_run_refuses_cuda_on_a_ray_cluster_without_gpus(tmp_path: Path) -> None:
    recipe = write_recipe(tiny_config(name="nogpu", run_dir=str(tmp_path / "runs"), cluster__device="cuda"),
                          tmp_path / "nogpu.yaml")
    done = subprocess.run([*LOWBAND, "run", str(recipe)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "COLUMNS": "200"})
    assert done.returncode == 2, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"error: {NO_GPU} the Ray cluster has no GPU" in " ".join(done.stderr.split())  # errors: stderr
    assert not (tmp_path / "runs" / "nogpu" / "summary.json").exists()
    assert not (tmp_path / "runs" / "nogpu" / "metrics.jsonl").exists()  # no coordinator was started


def test_a_bare_worker_refuses_cuda_without_a_gpu(tmp_path: Path) -> None:
    recipe = write_recipe(tiny_config(name="nogpu-worker", run_dir=str(tmp_path / "runs"), cluster__device="cuda",
                                      cluster__workers=1), tmp_path / "nogpu.yaml")
    coordinator, address = start_coordinator(recipe, tmp_path)
    worker = start_worker(address, tmp_path, 0)
    assert finish(worker, 120, tmp_path / "worker0.log") == 2
    log = " ".join((tmp_path / "worker0.log").read_text().split())
    assert f"error: {NO_GPU} this process sees no CUDA GPU" in log
    assert not (tmp_path / "worker0.json").exists()  # no result: it never trained
    coordinator.kill()
    coordinator.wait(timeout=30)
