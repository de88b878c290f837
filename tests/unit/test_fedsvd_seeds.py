"""bench.fedsvd_seeds: joining bench.fedsvd results over their seeds, and the paired comparison."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from scipy.stats import ttest_rel

import bench.common
from bench import fedsvd_seeds
from bench.fedsvd import METHODS

SHARED_VALUES: dict[str, Any] = {"base_eval_loss": 2.18, "base_script_eval_loss": 2.19, "hp": {"rounds": 2},
                                 "clients": 10, "per_round": 3, "model": {"n_embd": 8}, "lowrank": {"rank": 8},
                                 "dp": {"epsilon": 6.0}, "max_chars": 0}


def result(losses: dict[int, dict[str, float]], **changed: Any) -> dict[str, Any]:
    """A bench.fedsvd result with these final eval losses per seed and method (two-round curves ending there)."""
    rows = [{"method": kind, "seed": seed, "dp": True, "final_eval_loss": loss, "final_script_eval_loss": loss,
             "base_eval_loss": 2.18, "eval_loss_gain": 2.18 - loss, "noise_multiplier": 4.0, "dp_epsilon_max": 3.0,
             "wall_s": 1.0, "curve": [{"round": 0, "eval_loss": 2.18}, {"round": 1, "eval_loss": loss}]}
            for seed, per_method in losses.items() for kind, loss in per_method.items()]
    rows.append({"method": "fedsvd", "seed": "mean", "dp": True, "final_eval_loss": 0.0})  # dropped by join
    return {"bench": "fedsvd", "rows": rows, "claim": {"seeds": list(losses)}, **SHARED_VALUES, **changed}


def losses(svd: float, ffa: float, avg: float) -> dict[str, float]:
    return dict(zip(METHODS, (svd, ffa, avg), strict=True))


def test_join_takes_every_seed_and_drops_the_mean_rows() -> None:
    a = result({0: losses(2.16, 2.17, 2.165)})
    b = result({1: losses(2.15, 2.16, 2.152), 2: losses(2.15, 2.14, 2.151)})
    rows, seeds = fedsvd_seeds.join([("a", a), ("b", b)])
    assert seeds == [0, 1, 2]
    assert len(rows) == 9 and all(r["seed"] != "mean" for r in rows)


@pytest.mark.parametrize("field", fedsvd_seeds.SHARED)
def test_join_refuses_results_whose_shared_setup_differs(field: str) -> None:
    a = result({0: losses(2.16, 2.17, 2.165)})
    b = result({1: losses(2.15, 2.16, 2.152)}, **{field: "something else"})
    with pytest.raises(ValueError, match=f"differ in '{field}'"):
        fedsvd_seeds.join([("a", a), ("b", b)])


def test_a_result_from_before_a_hyperparameter_existed_is_compared_at_its_default() -> None:
    older = result({0: losses(2.16, 2.17, 2.165)}, hp={"rounds": 2})  # written before `rank` was recorded
    newer = result({1: losses(2.15, 2.16, 2.152)}, hp={"rounds": 2, "rank": 8})
    assert fedsvd_seeds.join([("older", older), ("newer", newer)])[1] == [0, 1]
    other_rank = result({1: losses(2.15, 2.16, 2.152)}, hp={"rounds": 2, "rank": 32})
    with pytest.raises(ValueError, match="differ in 'hp'"):
        fedsvd_seeds.join([("older", older), ("other", other_rank)])


def test_join_refuses_a_seed_run_twice() -> None:
    a = result({0: losses(2.16, 2.17, 2.165)})
    b = result({0: losses(2.15, 2.16, 2.152)})
    with pytest.raises(ValueError, match=r"repeats seed\(s\) \[0\]"):
        fedsvd_seeds.join([("a", a), ("b", b)])


def test_paired_differences_are_baseline_minus_fedsvd_on_the_same_seed() -> None:
    per_seed = {0: losses(2.160, 2.170, 2.161), 1: losses(2.150, 2.165, 2.149), 2: losses(2.155, 2.166, 2.158)}
    rows, seeds = fedsvd_seeds.join([("a", result(per_seed))])
    out = fedsvd_seeds.paired(rows, seeds)
    ffa = out["ffa-lora"]
    assert ffa["differences"] == pytest.approx([0.010, 0.015, 0.011])
    assert ffa["fedsvd_wins"] == 3
    avg = out["fedavg-lora"]
    assert avg["differences"] == pytest.approx([0.001, -0.001, 0.003])
    assert avg["fedsvd_wins"] == 2
    want = ttest_rel([2.161, 2.149, 2.158], [2.160, 2.150, 2.155])
    assert avg["t"] == pytest.approx(want.statistic) and avg["p"] == pytest.approx(want.pvalue)
    # FedAvg-LoRA is not beaten at p < 0.05 (one seed goes the other way), so the paired verdict fails.
    assert ffa["p"] < 0.05 and avg["p"] > 0.05
    assert out["paired_holds"] is False


def test_main_writes_the_joined_verdict(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench.common, "RESULTS", tmp_path)
    per_seed = [{s: losses(2.150 + 0.001 * s, 2.160 + 0.002 * s, 2.158 + 0.0015 * s)} for s in range(4)]
    names = []
    for i, part in enumerate((per_seed[0] | per_seed[1], per_seed[2] | per_seed[3])):
        path = tmp_path / f"part{i}.json"
        path.write_text(json.dumps(result(part)))
        names.append(str(path))
    fedsvd_seeds.main([*names, "--out", "joined"])
    doc = json.loads((tmp_path / "joined.json").read_text())
    assert doc["seeds"] == [0, 1, 2, 3]
    assert doc["claim"]["holds"] is True and doc["claim"]["on_every_seed"] is True
    assert doc["paired"]["paired_holds"] is True
    assert doc["paired"]["fedavg-lora"]["mean"] == pytest.approx(0.00875)
    means = {r["method"]: r["final_eval_loss"] for r in doc["rows"] if r["seed"] == "mean"}
    assert means["fedsvd"] == pytest.approx(2.1515)
    assert not math.isnan(doc["paired"]["ffa-lora"]["t"])
    assert doc["paired_script_eval"]["metric"] == "final_script_eval_loss"
    assert (tmp_path / "joined.png").stat().st_size > 0


def test_main_names_a_result_that_is_not_a_fedsvd_result(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "other.json"
    bad.write_text(json.dumps({"bench": "overlap", "rows": []}))
    good = tmp_path / "good.json"
    good.write_text(json.dumps(result({0: losses(2.16, 2.17, 2.165)})))
    with pytest.raises(SystemExit):
        fedsvd_seeds.main([str(good), str(bad)])
    assert "other.json is not a bench.fedsvd result" in capsys.readouterr().err
