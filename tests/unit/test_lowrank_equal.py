"""bench.lowrank_equal's verdict on hand-made rows, and the identical settings it hands both methods."""

from __future__ import annotations

from typing import Any

import pytest

from bench import lowrank_equal
from bench.lowrank_runs import finetune_config


def _curve(losses: list[float]) -> list[dict[str, Any]]:
    return [{"step": 30 * i, "tokens": 1000 * i, "eval_loss": v} for i, v in enumerate(losses)]


def _rows(lora: dict[int, list[float]], pissa: dict[int, list[float]], lr: float = 1e-3) -> list[dict[str, Any]]:
    rows = []
    for method, by_seed in (("lora", lora), ("pissa", pissa)):
        for seed, losses in by_seed.items():
            rows.append({"method": method, "lr": lr, "seed": seed, "final_eval_loss": losses[-1],
                         "curve": _curve(losses), "wall_s": 1.0})
    return rows


def test_the_claim_holds_when_pissa_is_lower_on_every_seed_and_point() -> None:
    lora = {0: [1.6, 1.50, 1.45], 1: [1.6, 1.52, 1.46], 2: [1.6, 1.51, 1.47]}
    pissa = {0: [1.6, 1.48, 1.44], 1: [1.6, 1.50, 1.449], 2: [1.6, 1.49, 1.461]}
    out = lowrank_equal.judge(_rows(lora, pissa), [1e-3], [0, 1, 2])
    one = out["by_lr"]["0.001"]
    assert one["paired"]["wins"] == 3 and one["paired"]["mean"] == pytest.approx((0.01 + 0.011 + 0.009) / 3)
    assert one["pissa_below_at_every_point"] and one["points"] == 2  # step 0 (the base) is not judged
    assert out["claim"]["holds"] and out["claim"]["lr"] == 1e-3


def test_the_claim_fails_when_pissa_ends_ahead_but_trails_on_the_way() -> None:
    lora = {0: [1.6, 1.48, 1.45], 1: [1.6, 1.49, 1.46], 2: [1.6, 1.47, 1.47]}
    pissa = {0: [1.6, 1.50, 1.44], 1: [1.6, 1.51, 1.449], 2: [1.6, 1.52, 1.461]}
    out = lowrank_equal.judge(_rows(lora, pissa), [1e-3], [0, 1, 2])
    assert out["by_lr"]["0.001"]["pissa_ahead"]
    assert not out["by_lr"]["0.001"]["pissa_below_at_every_point"]
    assert not out["claim"]["holds"]


def test_the_claim_fails_when_the_lead_is_not_consistent_over_seeds() -> None:
    lora = {0: [1.6, 1.50, 1.45], 1: [1.6, 1.52, 1.46], 2: [1.6, 1.51, 1.47]}
    pissa = {0: [1.6, 1.40, 1.35], 1: [1.6, 1.51, 1.47], 2: [1.6, 1.50, 1.48]}  # one big win, two losses
    out = lowrank_equal.judge(_rows(lora, pissa), [1e-3], [0, 1, 2])
    one = out["by_lr"]["0.001"]
    assert one["paired"]["mean"] > 0 and one["paired"]["p"] > 0.05 and one["paired"]["wins"] == 1
    assert not out["claim"]["holds"]


def test_only_the_first_lr_is_judged() -> None:
    good = _rows({0: [1.6, 1.5], 1: [1.6, 1.52]}, {0: [1.6, 1.4], 1: [1.6, 1.41]}, lr=3e-4)
    bad = _rows({0: [1.6, 1.4], 1: [1.6, 1.41]}, {0: [1.6, 1.5], 1: [1.6, 1.52]}, lr=1e-3)
    out = lowrank_equal.judge(good + bad, [1e-3, 3e-4], [0, 1])
    assert out["by_lr"]["0.0003"]["pissa_ahead"] and out["by_lr"]["0.0003"]["pissa_below_at_every_point"]
    assert not out["by_lr"]["0.001"]["pissa_ahead"]
    assert not out["claim"]["holds"] and out["claim"]["lr"] == 1e-3
    assert list(out["by_lr"]) == ["0.001", "0.0003"]


def test_a_missing_run_is_named() -> None:
    rows = _rows({0: [1.6, 1.5], 1: [1.6, 1.5]}, {0: [1.6, 1.4]})
    with pytest.raises(ValueError, match=r"\('pissa', 0.001, 1\)"):
        lowrank_equal.judge(rows, [1e-3], [0, 1])


def test_mean_curve_averages_the_points_every_seed_has() -> None:
    short = _curve([1.6, 1.5])
    long = _curve([1.6, 1.3, 1.2])
    assert [(p["step"], p["eval_loss"]) for p in lowrank_equal.mean_curve([short, long])] == [
        (0, pytest.approx(1.6)), (30, pytest.approx(1.4))]


def test_both_methods_get_identical_settings_but_their_init() -> None:
    lora = finetune_config("lora-r8", 300, "/base.pt", 1e-3, 0, 30, seed=2, alpha=lowrank_equal.ALPHA)
    pissa = finetune_config("pissa-r8", 300, "/base.pt", 1e-3, 0, 30, seed=2, alpha=lowrank_equal.ALPHA)
    assert lora.lowrank is not None and pissa.lowrank is not None
    assert (lora.lowrank.method, pissa.lowrank.method) == ("lora", "pissa")
    assert lora.lowrank.model_copy(update={"method": "pissa"}) == pissa.lowrank
    assert lora.lowrank.alpha == lora.lowrank.rank == 8
    assert lora.model_copy(update={"lowrank": None, "name": ""}) == pissa.model_copy(update={"lowrank": None,
                                                                                          "name": ""})


def test_alpha_cannot_be_set_without_adapters() -> None:
    with pytest.raises(ValueError, match="full has no adapters"):
        finetune_config("full", 300, "/base.pt", 1e-3, 0, 30, alpha=8)
