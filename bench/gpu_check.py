"""The NCCL paths on a CUDA machine: the round loop over all-gather and the DDP baseline, on the GPU.

CI has no GPU, so these paths are checked by hand on a lent machine: `python -m bench.gpu_check`. One GPU
allows one NCCL rank (NCCL refuses two ranks on one device), so every run here has world size 1: what it
checks is that the whole path runs on CUDA tensors through NCCL and learns, not the collective's maths
(the CPU suite checks those over gloo). Rows: contender, backend, device, eval loss at the start and at
the end, seconds per inner step, and bytes per worker sent, received and both; written to
bench/results/gpu_check.json.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from bench.common import command_line, write_result
from protocols.config import RunConfig, parse_config
from worker.ddp import run_ddp_local
from worker.runners import run_allgather_local

PROTOCOLS: dict[str, dict[str, Any]] = {
    "diloco": {"kind": "diloco", "inner_steps": 10},
    "sparseloco": {"kind": "sparseloco", "inner_steps": 10},
    "diloco-co2": {"kind": "diloco", "inner_steps": 10, "outer_momentum": 0.0, "overlap": {"enabled": True}},
    "sparseloco-eager": {"kind": "sparseloco", "inner_steps": 10, "overlap": {"enabled": True, "eager": True}},
    "ddp": {"kind": "ddp", "backend": "nccl"},
}


def config(protocol: dict[str, Any], steps: int) -> RunConfig:
    return parse_config({
        "name": f"gpu-{protocol['kind']}",
        "model": {"n_layer": 2, "n_head": 4, "n_embd": 128, "block_size": 64},
        "data": {"batch_size": 16, "max_chars": 400_000},
        "train": {"steps": steps, "lr": 3e-3, "warmup_steps": 5, "eval_batches": 4, "eval_every_steps": steps // 2},
        "protocol": protocol,
        "cluster": {"workers": 1},
    })


def run(name: str, steps: int) -> dict[str, Any]:
    cfg = config(PROTOCOLS[name], steps)
    began = time.perf_counter()
    if name == "ddp":
        [result] = run_ddp_local(cfg, 1)
        first, last = result["evals"][0]["eval_loss"], result["eval_loss"]
    else:
        [result] = run_allgather_local(cfg, 1)
        first, last = result["evals"][0]["eval_loss"], result["final_eval_loss"]
    wall = time.perf_counter() - began
    return {"contender": name, "backend": result["backend"], "device": torch.cuda.get_device_name(0),
            "eval_loss_start": first, "eval_loss_end": last, "learned": last < first - 0.1,
            "seconds_per_step": wall / steps, "bytes_sent_per_worker": result["bytes_sent"],
            "bytes_received_per_worker": result["bytes_received"], "bytes_total_per_worker": result["bytes_total"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60, help="inner steps per run (default 60)")
    parser.add_argument("--contenders", nargs="+", default=list(PROTOCOLS), choices=list(PROTOCOLS))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("no CUDA GPU is visible: this check needs one (the CPU suite covers gloo)")
    rows = [run(name, args.steps) for name in args.contenders]
    columns = ["contender", "backend", "device", "eval_loss_start", "eval_loss_end", "learned",
               "seconds_per_step", "bytes_sent_per_worker", "bytes_received_per_worker", "bytes_total_per_worker"]
    write_result("gpu_check", command_line("bench.gpu_check"), rows, columns)


if __name__ == "__main__":
    main()
