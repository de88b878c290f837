"""Whole rounds of one protocol over the gRPC star and over all-gather, side by side (`bench.transport`).

Two workers run dense DiLoCo with one inner step per round on a GPT of a fixed size, through the same
round loop (`worker/loop.py`), once over each transport: the gRPC star (a coordinator process and two
`run_grpc_worker` processes on loopback) and all-gather (two gloo ranks). A row reports the median seconds
per round (train step, exchange, apply, digest check) after `warmup` rounds, the slower worker's, and the
bytes a worker sent, received and both over the run and per round (averaged over the workers and over every
round run).
`seconds_vs_grpc` is the ratio to the gRPC row.
"""

from __future__ import annotations

import statistics
from typing import Any

import torch.multiprocessing as mp

from protocols.config import RunConfig, parse_config
from worker.loop import WorkerResult
from worker.runners import run_allgather_local


def rounds_config(rounds: int, n_embd: int, n_layer: int) -> RunConfig:
    return parse_config({
        "name": "transport-rounds",
        "model": {"n_layer": n_layer, "n_head": 4, "n_embd": n_embd, "block_size": 64},
        "data": {"batch_size": 8, "max_chars": 400_000},
        "train": {"steps": rounds, "warmup_steps": 1, "eval_batches": 1, "eval_every_steps": 1_000_000},
        "protocol": {"kind": "diloco", "inner_steps": 1, "outer_lr": 1.0, "outer_momentum": 0.5},
        "cluster": {"workers": 2, "round_deadline_s": 3600, "heartbeat_timeout_s": 3600},
    })


def _grpc_worker(address: str, results: Any) -> None:
    """Spawned: one `lowband worker` equivalent; puts its WorkerResult."""
    from worker.client import CoordinatorClient
    from worker.runners import run_grpc_worker

    client = CoordinatorClient(address)
    try:
        results.put(run_grpc_worker(client, threads=1))
    finally:
        client.close()


def _grpc_rounds(cfg: RunConfig) -> list[WorkerResult]:
    from bench.transport import _collect, _finish, _serve

    ctx = mp.get_context("spawn")
    ours, theirs = ctx.Pipe()
    results = ctx.Queue()
    server = ctx.Process(target=_serve, args=(cfg.model_dump(), theirs), name="coordinator", daemon=True)
    server.start()
    procs = [server]
    try:
        if not ours.poll(120):
            raise RuntimeError(f"the coordinator process reported no address (exit code {server.exitcode})")
        address = ours.recv()
        for i in range(cfg.cluster.workers):
            procs.append(ctx.Process(target=_grpc_worker, args=(address, results), name=f"worker{i}", daemon=True))
            procs[-1].start()
        return list(_collect(results, procs, cfg.cluster.workers))
    finally:
        ours.send("stop")
        _finish(procs)


def _row(transport: str, cfg: RunConfig, per_worker: list[tuple[list[float], int, int]], warmup: int,
         params: int) -> dict[str, Any]:  # fmt: skip
    timed = [seconds[warmup:] for seconds, _, _ in per_worker]
    slower = [max(step) for step in zip(*timed, strict=True)]
    rounds = cfg.rounds
    sent = sum(sent for _, sent, _ in per_worker) / len(per_worker)  # per worker, the whole run
    received = sum(received for _, _, received in per_worker) / len(per_worker)
    return {
        "contender": f"rounds-{transport}",
        "transport": transport,
        "parameters": params,
        "megabytes": params * 4 / (1 << 20),
        "seconds": statistics.median(slower),
        "seconds_min": min(slower),
        "seconds_max": max(slower),
        "bytes_sent_per_worker": sent,
        "bytes_received_per_worker": received,
        "bytes_total_per_worker": sent + received,
        "bytes_sent_per_round": sent / rounds,
        "bytes_received_per_round": received / rounds,
        "bytes_total_per_round": (sent + received) / rounds,
    }


def bench_rounds(rounds: int, warmup: int, n_embd: int, n_layer: int) -> list[dict[str, Any]]:
    """The rounds-grpc and rounds-allgather rows (see the module docstring)."""
    from worker.data import load_corpus
    from worker.model import GPT

    cfg = rounds_config(rounds + warmup, n_embd, n_layer)
    vocab = load_corpus(cfg.data.eval_fraction, cfg.data.max_chars).tokenizer.vocab_size
    params = sum(p.numel() for p in GPT(cfg.model, vocab).parameters())
    grpc = [(r.round_seconds, r.bytes_sent, r.bytes_received) for r in _grpc_rounds(cfg)]
    ranks = [(r["round_seconds"], r["bytes_sent"], r["bytes_received"]) for r in run_allgather_local(cfg, 2)]
    rows = [_row("grpc", cfg, grpc, warmup, params), _row("allgather", cfg, ranks, warmup, params)]
    for row in rows:
        row["seconds_vs_grpc"] = row["seconds"] / rows[0]["seconds"]
    return rows
