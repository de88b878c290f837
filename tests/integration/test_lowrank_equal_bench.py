"""bench.lowrank_equal on a tiny plan: a pretrained base (4 all-gather processes), then LoRA and PiSSA at rank 8 and
alpha 8 from it, at one lr and one seed, each in 4 fresh processes (the verdict over several seeds is
tests/unit/test_lowrank_equal.py's).

What the comparison rests on is checked, not its outcome: both methods start from the same model (LoRA's B is 0,
PiSSA's residual plus its factors is the base weight), so every run's eval at step 0 is the base's; both train;
the verdict is computed from these rows, and one seed never makes it hold.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from bench.lowrank_equal import judge, run_all
from bench.lowrank_runs import pretrain

STEPS, MAX_CHARS = 30, 200_000


def test_lora_and_pissa_start_from_the_same_base_and_are_judged(tmp_path: Path) -> None:
    base = pretrain(STEPS, MAX_CHARS, tmp_path / "base")
    rows = run_all(base.checkpoint, [1e-3], [0], STEPS, STEPS, MAX_CHARS, log=lambda _: None)
    assert sorted((r["method"], r["seed"]) for r in rows) == [("lora", 0), ("pissa", 0)]
    for r in rows:
        steps = [p["step"] for p in r["curve"]]
        assert steps == [0, STEPS], r
        assert r["curve"][0]["eval_loss"] == pytest.approx(base.base_eval_loss, abs=1e-4), r
        assert math.isfinite(r["final_eval_loss"]) and r["final_eval_loss"] == r["curve"][-1]["eval_loss"]
        assert r["final_eval_loss"] != pytest.approx(base.base_eval_loss, abs=1e-4)  # it trained
        assert r["bytes_sent_per_worker"] > 0 and r["bytes_received_per_worker"] > 0
        assert r["bytes_total_per_worker"] == pytest.approx(r["bytes_sent_per_worker"] + r["bytes_received_per_worker"])
    finals = {r["method"]: r["final_eval_loss"] for r in rows}
    assert finals["lora"] != finals["pissa"]
    out = judge(rows, [1e-3], [0])
    one = out["by_lr"]["0.001"]
    assert one["mean_final"] == pytest.approx(finals)
    assert one["paired"]["differences"] == pytest.approx([finals["lora"] - finals["pissa"]])
    assert math.isnan(one["paired"]["p"]) and not out["claim"]["holds"]  # one seed cannot show it
