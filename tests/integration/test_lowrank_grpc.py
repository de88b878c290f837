"""LoRA under DiLoCo over gRPC, real processes on loopback: a coordinator and 4 workers fine-tune a checkpoint
on the held-out plays. Only adapter factors cross the wire after the start, the frozen base hashes alike on
every worker, and a worker whose base differs is refused at join."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest
import torch

from coordinator.rundir import load_checkpoint
from coordinator.server import CoordinatorServer
from deploy.export import export_run, load_trained_model
from tests.conftest import tiny_config
from tests.integration.procs import finish, start_coordinator, start_worker, write_recipe
from worker.data import load_corpus
from worker.models import build_architecture

WORKERS = 4


def pretrained_checkpoint(tmp: Path) -> tuple[Path, int]:
    """A base to fine-tune: the tiny GPT after a few steps, as a plain checkpoint; its parameter count."""
    cfg = tiny_config()
    torch.manual_seed(3)
    model = build_architecture(cfg, load_corpus(cfg.data.eval_fraction, cfg.data.max_chars).tokenizer.vocab_size)
    path = tmp / "pretrained.pt"
    torch.save({"round": 0, "params": {n: p.detach().clone() for n, p in model.named_parameters()}}, path)
    return path, sum(p.numel() for p in model.parameters())


def test_four_workers_fine_tune_lora_over_grpc_exchanging_only_factors(tmp_path: Path) -> None:
    checkpoint, dense_params = pretrained_checkpoint(tmp_path)
    cfg = tiny_config(run_dir=str(tmp_path / "runs"), init_from=str(checkpoint),
                      data={"batch_size": 8, "max_chars": 60_000, "plays": "finetune", "split": "by_play"},
                      train={"steps": 15, "lr": 1e-2, "warmup_steps": 2, "eval_batches": 2, "eval_every_steps": 5},
                      lowrank={"method": "lora", "rank": 4, "alpha": 8},
                      cluster={"workers": WORKERS, "round_deadline_s": 120, "heartbeat_interval_s": 0.5})
    recipe = write_recipe(cfg, tmp_path / "lora.yaml")
    coord, address = start_coordinator(recipe, tmp_path)
    workers = [start_worker(address, tmp_path, i) for i in range(WORKERS)]
    for i, w in enumerate(workers):
        assert finish(w, 300, tmp_path / f"worker{i}.log") == 0, (tmp_path / f"worker{i}.log").read_text()[-3000:]
    assert finish(coord, 120, tmp_path / "coordinator.log") == 0

    run_dir = tmp_path / "runs" / "tiny"
    summary = json.loads((run_dir / "summary.json").read_text())
    results = [json.loads((tmp_path / f"worker{i}.json").read_text()) for i in range(WORKERS)]
    assert summary["rounds"] == 3 and [r["rounds"] for r in results] == [3] * WORKERS

    # What the aggregator holds and every worker exchanged: the adapter factors, by name.
    ckpt = load_checkpoint(run_dir / "checkpoint.pt")
    names = set(ckpt["params"])
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names), sorted(names)[:4]
    factor_bytes = sum(t.numel() * t.element_size() for t in ckpt["params"].values())
    dense_bytes = 4 * dense_params
    assert all(r["trainable_params"] * 4 == factor_bytes for r in results)
    # Bytes both ways, per worker: at most the factors' initial state plus, each round, one update up and one
    # aggregate down with framing, never a dense copy of the model.
    for r in results:
        assert r["bytes_total"] == r["bytes_sent"] + r["bytes_received"]
        assert 3 * factor_bytes <= r["bytes_sent"] <= 4 * factor_bytes * 1.1 + 20_000
        assert 3 * factor_bytes <= r["bytes_received"] <= 4 * factor_bytes * 1.1 + 20_000
    assert 4 * factor_bytes * 1.1 + 20_000 < 3 * dense_bytes  # so the bounds above exclude dense exchanges

    # The frozen base: one digest, the same on every worker at the end and at the coordinator.
    hashes = {r["base_hash"] for r in results}
    assert len(hashes) == 1 and len(summary["base_digest"]) == 64 and hashes == {summary["base_digest"]}
    assert ckpt["base_digest"] == summary["base_digest"]

    # The fine-tuning loss falls.
    first = [r["evals"][0]["eval_loss"] for r in results]
    assert all(r["final_eval_loss"] < f for r, f in zip(results, first, strict=True))

    # Export merges the factors into the base: a plain model computing the adapted model's outputs.
    out = export_run(run_dir)
    _, merged = load_trained_model(out)
    assert set(dict(merged.named_parameters())) == set(load_checkpoint(checkpoint)["params"])
    assert any(not torch.equal(p, load_checkpoint(checkpoint)["params"][n]) for n, p in merged.named_parameters())


def test_a_worker_whose_frozen_base_differs_is_refused_at_join() -> None:
    from worker.client import CoordinatorClient

    server = CoordinatorServer(tiny_config(lowrank={"method": "lora"})).start()
    clients = [CoordinatorClient(server.address) for _ in range(2)]
    try:
        for client in clients:
            client.join("test")
        assert clients[0].attest_base("a" * 64) == "a" * 64
        with pytest.raises(grpc.RpcError) as err:
            clients[1].attest_base("b" * 64)
        assert err.value.code() is grpc.StatusCode.FAILED_PRECONDITION
        assert "frozen base weights" in (err.value.details() or "")
        assert server.state.base_digest == "a" * 64
    finally:
        for client in clients:
            client.close()
        server.stop()
