"""bench.gossip on a tiny grid: every contender at 4 nodes in process, then diloco over the gRPC star and one
gossip contender over real p2p worker processes.

What is checked is what the benchmark's table rests on: every row has its keys, moved bytes, reports the
transport it really ran over (gossip: inproc or p2p, never through a coordinator), its rounds to target are
None or a round of the run, and DiLoCo reaches its own target (its final eval loss) by definition.
No loss or wall-clock thresholds.
"""

from __future__ import annotations

import math

from bench.gossip import Grid, collect, rounds_to
from bench.gossip_runs import CONTENDERS, twin

REQUIRED = ("contender", "nodes", "transport", "rounds", "rounds_to_target", "bytes_total_per_worker",
            "bytes_to_target_per_worker", "target_eval_loss", "initial_eval_loss", "final_eval_loss",
            "eval_loss_curve", "consensus_distance_final", "consensus_distance_curve")


def test_rounds_to_is_the_first_round_at_or_below_the_target() -> None:
    assert rounds_to([4.0, 3.5, 3.2, 3.3, 3.1], 3.3) == 2
    assert rounds_to([4.0, 3.5], 3.0) is None
    assert rounds_to([None, 3.0], 3.0) == 1
    assert twin("ring-vc") == "ring" and twin("epidemic") == "epidemic-vc"


def test_tiny_grid_rows_over_inproc_p2p_and_the_grpc_star() -> None:
    grid = Grid(nodes=4, grpc_nodes=4, steps=16, inner_steps=4, grpc_contenders=["diloco", "ring-vc"])
    doc = collect(grid, log=lambda _: None)
    rows = doc["rows"]
    assert [(r["contender"], r["transport"]) for r in rows] == [
        ("diloco", "inproc"), *[(c, "inproc") for c in CONTENDERS if c != "diloco"],
        ("diloco", "grpc"), ("ring-vc", "p2p"),
    ]
    rounds = grid.steps // grid.inner_steps
    for r in rows:
        assert all(key in r for key in REQUIRED), r
        assert r["nodes"] == 4 and r["rounds"] == rounds
        assert r["bytes_total_per_worker"] > 0
        assert len(r["eval_loss_curve"]) == rounds + 1
        assert all(e is not None and math.isfinite(e) for e in r["eval_loss_curve"]), r["eval_loss_curve"]
        assert r["final_eval_loss"] == r["eval_loss_curve"][-1] < r["initial_eval_loss"]
        k = r["rounds_to_target"]
        assert k is None or 0 <= k <= r["rounds"]
        if k is not None:
            assert r["eval_loss_curve"][k] <= r["target_eval_loss"]
            assert 0 <= r["bytes_to_target_per_worker"] <= r["bytes_total_per_worker"]
        if r["contender"] == "diloco":
            assert r["target_eval_loss"] == r["final_eval_loss"]
            assert k is not None and r["rounds_to_target_vs_diloco"] == 1.0
            assert r["consensus_distance_final"] == 0.0
        else:
            assert r["transport"] in ("inproc", "p2p")  # coordinator-free: models never pass a coordinator
            assert r["consensus_distance_final"] is not None and r["consensus_distance_final"] >= 0
    # The variance-corrected ring moves the same dense models as the plain ring; CHOCO's top-10% far fewer.
    inproc = {r["contender"]: r for r in rows if r["transport"] == "inproc"}
    assert inproc["ring-vc"]["bytes_total_per_worker"] == inproc["ring"]["bytes_total_per_worker"]
    assert inproc["choco-topk"]["bytes_total_per_worker"] < 0.5 * inproc["ring"]["bytes_total_per_worker"]
    target = doc["target"]
    assert target["checked"] and isinstance(target["passed"], bool)
    assert target["best_vc_contender"].endswith("-vc")
    assert target["target_eval_loss"] == inproc["diloco"]["final_eval_loss"]
