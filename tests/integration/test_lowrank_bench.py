"""bench.lowrank on a tiny plan: a pretrained base (4 all-gather processes), then full fine-tuning and PiSSA r8 from
it, each in 4 fresh processes.

What is checked is what the benchmark's table rests on: both contenders start from the pretrained checkpoint
(their first eval point is the base's eval loss), the adapters train and send a fraction of the weights and keep
a fraction of the optimizer state, every rank ends on the same replica over the same frozen base, and the
ratios and targets are computed from the rows. No loss-quality or wall-clock thresholds: a smoke run.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from bench.lowrank import Plan, collect, plot, targets
from bench.lowrank_runs import LRS, WORKERS

FIELDS = ("contender", "lr", "eval_loss", "bytes_sent_per_worker", "bytes_received_per_worker",
          "bytes_total_per_worker", "peak_rss_bytes", "peak_rss_bytes_per_worker", "optimizer_state_bytes",
          "trainable_params", "tokens", "wall_s", "bytes_vs_full", "optimizer_state_vs_full", "eval_loss_vs_full")


def test_tiny_plan_full_vs_pissa(tmp_path: Path) -> None:
    plan = Plan(pretrain_steps=30, steps=30, contenders=["full", "pissa-r8"], max_chars=200_000, eval_every=30)
    doc = collect(plan, log=lambda _: None, work_dir=tmp_path)
    assert doc["failures"] == []
    rows = {r["contender"]: r for r in doc["rows"]}
    assert list(rows) == ["full", "pissa-r8"]
    for r in rows.values():
        assert all(key in r for key in FIELDS), r
        assert r["eval_loss"] is not None and math.isfinite(r["eval_loss"])
        assert r["lr"] == LRS[r["contender"]]
        assert r["tokens"] == WORKERS * 30 * 16 * 64
        assert r["steps"] == 30 and r["rounds"] == 1
        assert r["replicas_agree"] and r["base_hashes_agree"] and r["resyncs"] == 0
        assert len(r["peak_rss_bytes_per_worker"]) == WORKERS
        assert r["peak_rss_bytes"] == max(r["peak_rss_bytes_per_worker"]) > r["rss_at_start_bytes"] > 0
        assert r["bytes_sent_per_worker"] > 0 and r["bytes_received_per_worker"] > 0
        # Fine-tuning starts from the pretrained base: the first eval point (step 0) is the base's loss
        # (PiSSA moves the principal part of each weight into the adapter: the same function up to rounding).
        first = doc["curves"][r["contender"]][0]
        assert first["step"] == 0
        assert first["eval_loss"] == pytest.approx(doc["base_eval_loss"], abs=1e-3)
        assert r["eval_loss"] < doc["base_eval_loss"]  # 30 steps on the romances lower the loss on them
    full, pissa = rows["full"], rows["pissa-r8"]
    assert full["method"] == "full" and pissa["method"] == "pissa" and pissa["rank"] == 8
    # The adapters: rank-8 factors of every projection, a small fraction of the model, and only they move.
    assert pissa["trainable_params"] * 10 < full["trainable_params"]
    assert pissa["bytes_total_per_worker"] * 10 < full["bytes_total_per_worker"]
    assert pissa["optimizer_state_bytes"] * 10 < full["optimizer_state_bytes"]
    assert full["bytes_vs_full"] == full["optimizer_state_vs_full"] == full["eval_loss_vs_full"] == 1.0
    assert pissa["bytes_vs_full"] == pytest.approx(pissa["bytes_total_per_worker"] / full["bytes_total_per_worker"])
    assert pissa["eval_loss_vs_full"] == pytest.approx(pissa["eval_loss"] / full["eval_loss"])
    # AdamW keeps two fp32 moments per trainable weight (plus a step counter per tensor).
    assert 8 * full["trainable_params"] <= full["optimizer_state_bytes"] < 8.1 * full["trainable_params"]
    t = doc["targets"]
    assert t["pissa_bytes_reduction_vs_full"]["pass"] is True
    assert t["pissa_optimizer_state_reduction_vs_full"]["pass"] is True
    assert t["pissa_eval_loss_vs_full"]["value"] == pytest.approx(pissa["eval_loss_vs_full"])
    assert t["pissa_eval_loss_minus_lora"]["pass"] is None  # no lora-r8 row in this plan
    assert doc["pretrain"]["steps"] == 30 and doc["pretrain"]["tokens"] == WORKERS * 30 * 16 * 64
    assert doc["pretrain"]["eval_loss_pretrain_plays"] is not None
    assert plot(doc, tmp_path / "lowrank.png").stat().st_size > 0


def test_targets_fail_when_pissa_misses_them() -> None:
    rows = [
        {"contender": "full", "eval_loss": 1.50, "bytes_total_per_worker": 1e7, "optimizer_state_bytes": 3e6},
        {"contender": "lora-r8", "eval_loss": 1.52, "bytes_total_per_worker": 8e5, "optimizer_state_bytes": 2.6e5},
        {"contender": "pissa-r8", "eval_loss": 1.56, "bytes_total_per_worker": 2e6, "optimizer_state_bytes": 1e6},
    ]
    t = targets(rows)
    assert t["pissa_eval_loss_vs_full"]["pass"] is False  # 4% behind
    assert t["pissa_bytes_reduction_vs_full"]["pass"] is False  # 5x
    assert t["pissa_optimizer_state_reduction_vs_full"]["pass"] is False  # 3x
    assert t["pissa_eval_loss_minus_lora"]["pass"] is False
    assert t["pissa_eval_loss_minus_lora"]["value"] == pytest.approx(0.04)
