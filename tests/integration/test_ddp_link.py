"""The DDP baseline behind per-rank emulated links (worker/link_hook.py), with real processes on loopback gloo:
the link only delays the all-reduced gradients, each rank by its own link."""

from __future__ import annotations

import pytest

from protocols.config import ClusterConfig, DataConfig, LinkConfig, ModelConfig, RunConfig, TrainConfig
from protocols.ddp import DDPConfig
from protocols.settings import WorkerLinkConfig
from worker.ddp import ring_allreduce_bytes, run_ddp_local

STEPS = 6
PLAIN = RunConfig(
    name="ddp-link-test",
    seed=5,
    model=ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=32),
    data=DataConfig(batch_size=8, max_chars=60_000),
    train=TrainConfig(steps=STEPS, lr=1e-2, warmup_steps=2, eval_every_steps=STEPS, eval_batches=2),
    protocol=DDPConfig(backend="gloo"),
    cluster=ClusterConfig(workers=2),
)
# Rank 0 on a 2 Mbit/s link, rank 1 on 20 Mbit/s; 5 ms a hop for both.
SLOW = PLAIN.model_copy(update={"link": LinkConfig(
    bandwidth_mbps=20, latency_ms=5, workers=[WorkerLinkConfig(bandwidth_mbps=2), WorkerLinkConfig()])})


def test_a_slow_link_holds_each_rank_by_its_own_link_and_changes_no_parameter() -> None:
    plain = run_ddp_local(PLAIN, world_size=2)
    slow = run_ddp_local(RunConfig.model_validate(SLOW.model_dump()), world_size=2)

    assert [s["link_delay_s"] for s in plain] == [0.0, 0.0]
    # The emulation delays the gradients, it does not change them: the same training, bit for bit.
    assert slow[0]["param_hash"] == slow[1]["param_hash"] == plain[0]["param_hash"]
    assert slow[0]["eval_loss"] == plain[0]["eval_loss"]
    assert slow[0]["bytes_sent"] == plain[0]["bytes_sent"]  # byte counts are the ring's, link or not

    # Each step's buckets carry the ring's 2 (N - 1) / N of the gradient bytes through the rank's link.
    per_step = ring_allreduce_bytes(slow[0]["gradient_bytes"], 2)
    floor0 = STEPS * per_step / (2e6 / 8)  # about 1.5 s at 2 Mbit/s
    floor1 = STEPS * per_step / (20e6 / 8)
    delay0, delay1 = slow[0]["link_delay_s"], slow[1]["link_delay_s"]
    assert delay0 == pytest.approx(floor0 + STEPS * 2 * 0.005, rel=0.25)
    assert delay1 == pytest.approx(floor1 + STEPS * 2 * 0.005, rel=0.5)
    assert delay0 > 5 * delay1
    # The slow rank's link sets the pace of the whole ring: rank 1, held little itself, waits for rank 0.
    assert slow[1]["wall_s"] > 0.8 * floor0
