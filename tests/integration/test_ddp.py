"""The DDP baseline with real processes on loopback gloo: the same `Session` as the round loop, gradients
all-reduced every step, bytes counted by the ring all-reduce model."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from protocols.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from protocols.ddp import DDPConfig
from worker.data import load_corpus
from worker.ddp import run_ddp_local, run_ddp_worker
from worker.model import GPT
from worker.spawn import spawn_on_loopback
from worker.trainer import InnerTrainer

STEPS = 12
# The keys every runner's summary has (`Session.summary`), plus DDP's own.
SUMMARY_KEYS = {"worker_index", "workers", "protocol", "steps", "tokens", "bytes_sent", "bytes_received",
                "bytes_total", "wall_s", "rank", "world_size", "backend", "eval_loss", "train_loss",
                "tokens_total", "eval_s", "gradient_bytes", "param_hash", "evals"}
CFG = RunConfig(
    name="ddp-test",
    seed=3,
    model=ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=32),
    data=DataConfig(batch_size=8, max_chars=60_000),
    train=TrainConfig(steps=STEPS, lr=1e-2, warmup_steps=2, eval_every_steps=STEPS // 2, eval_batches=4),
    protocol=DDPConfig(backend="gloo"),
)


def _single_process_on_the_union_batch() -> float:
    """Eval loss of one process training on both ranks' batches at once: what DDP should equal."""
    corpus = load_corpus(CFG.data.eval_fraction, CFG.data.max_chars)
    torch.manual_seed(CFG.seed)
    model = GPT(CFG.model, corpus.tokenizer.vocab_size)
    ranks = [corpus.shard(r, 2, "iid", CFG.seed).sampler(8, 32) for r in range(2)]
    union = ((torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]])) for a, b in zip(*ranks, strict=True))
    trainer = InnerTrainer(model, union, CFG.train, CFG.train.steps)
    trainer.train(CFG.train.steps)
    return trainer.evaluate(corpus.eval_batches(8, 32, CFG.train.eval_batches))


def test_two_ranks_agree_count_ring_bytes_and_match_the_union_batch() -> None:
    summaries = run_ddp_local(CFG, world_size=2)
    assert [s["rank"] for s in summaries] == [0, 1]
    zero, one = summaries
    assert SUMMARY_KEYS <= set(zero) and SUMMARY_KEYS <= set(one)
    assert (zero["worker_index"], one["worker_index"], zero["workers"], zero["protocol"]) == (0, 1, 2, "ddp")
    assert zero["param_hash"] == one["param_hash"]  # all-reduce kept the replicas bit-identical
    assert zero["evals"] == one["evals"]

    vocab = load_corpus(CFG.data.eval_fraction, CFG.data.max_chars).tokenizer.vocab_size
    gradient_bytes = GPT(CFG.model, vocab).num_params() * 4
    assert zero["gradient_bytes"] == gradient_bytes
    # Ring all-reduce: each of N ranks sends and receives 2 (N - 1) / N of the gradient bytes per step.
    for s in summaries:
        assert s["bytes_sent"] == s["bytes_received"] == STEPS * 2 * (2 - 1) / 2 * gradient_bytes
        assert s["bytes_total"] == s["bytes_sent"] + s["bytes_received"]
    assert zero["steps"] == STEPS
    assert zero["tokens"] == STEPS * 8 * 32 and zero["tokens_total"] == 2 * zero["tokens"]
    assert [p["step"] for p in zero["evals"]] == [0, STEPS // 2, STEPS]
    assert zero["evals"][1]["bytes_sent"] == STEPS // 2 * gradient_bytes

    assert zero["eval_loss"] < zero["evals"][0]["eval_loss"] - 0.3
    # Averaging equal-size batch gradients over ranks equals one step on their union batch.
    assert zero["eval_loss"] == pytest.approx(_single_process_on_the_union_batch(), abs=1e-3)


def _rank_reporting_progress(rank: int, world_size: int, init_method: str, cfg: RunConfig) -> dict[str, Any]:
    seen: list[dict[str, Any]] = []
    summary = run_ddp_worker(rank, world_size, init_method, cfg, progress=seen.append)
    return {"summary": summary, "seen": seen, "still_initialized": torch.distributed.is_initialized()}


def test_single_rank_reports_progress_and_sends_nothing() -> None:
    cfg = CFG.model_copy(update={"train": TrainConfig(steps=4, eval_every_steps=2, eval_batches=2)})
    # In a spawned process, like every process group the tests open: one opened in the pytest process
    # itself is where a CI run once hung inside C code, out of reach of pytest-timeout's thread.
    [out] = spawn_on_loopback(_rank_reporting_progress, 1, (cfg,))
    seen, summary = out["seen"], out["summary"]
    assert [p["step"] for p in seen] == [0, 2, 4] and all(p["rank"] == 0 for p in seen)
    assert summary["bytes_sent"] == summary["bytes_received"] == summary["bytes_total"] == 0
    assert summary["eval_loss"] == seen[-1]["eval_loss"]
    assert not out["still_initialized"]  # the process group was destroyed


def test_a_failing_rank_is_reported_not_waited_on() -> None:
    broken = CFG.model_copy(update={"data": DataConfig(max_chars=100)})  # too little text per play
    with pytest.raises(RuntimeError, match=r"rank 0 failed:(.|\n)*max_chars"):
        run_ddp_local(broken, world_size=1)
