"""The loss curve places each evaluation at the tokens and bytes spent before it."""

from __future__ import annotations

import json
from pathlib import Path

from deploy.report import consensus_rows, eval_curve, plot_consensus, plot_utilization, span_rows


def test_round_evals_sit_at_the_totals_before_their_round(tmp_path: Path) -> None:
    rounds = [
        {"event": "round", "round": 0, "eval_loss": 4.0, "tokens": 100, "bytes_total_per_worker": 20},
        {"event": "round", "round": 1, "eval_loss": None, "tokens": 200, "bytes_total_per_worker": 40},
        {"event": "round", "round": 2, "eval_loss": 3.0, "tokens": 300, "bytes_total_per_worker": 60},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rounds))
    summary = {"workers": {"w0": {}, "w1": {}}, "final_eval_loss": 2.5, "tokens": 300, "bytes_total_per_worker": 61.0}
    # The initial state (round 0's eval) at 0 tokens; round 2's start after rounds 0-1: 200 tokens, 40 bytes per worker.
    assert eval_curve(tmp_path, summary) == [(0.0, 0.0, 4.0), (200.0, 40.0, 3.0), (300.0, 61.0, 2.5)]


def test_ddp_eval_events_are_taken_where_they_say(tmp_path: Path) -> None:
    evals = [{"event": "eval", "step": 0, "tokens": 0, "eval_loss": 4.4, "bytes_total_per_worker": 0},
             {"event": "eval", "step": 10, "tokens": 640, "eval_loss": 3.1, "bytes_total_per_worker": 400}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in evals))
    summary = {"workers": {"rank0": {}, "rank1": {}}, "final_eval_loss": None}
    assert eval_curve(tmp_path, summary) == [(0.0, 0.0, 4.4), (640.0, 400.0, 3.1)]


def test_span_rows_average_the_ranks_spans_round_by_round_and_keep_each_ranks_utilization() -> None:
    ranks = [{"worker_id": "rank0", "spans": [
                 {"round": 0.0, "wall_s": 2.0, "compute_s": 1.0, "blocked_s": 1.0, "comm_s": 1.5, "utilization": 0.5},
                 {"round": 1.0, "wall_s": 1.0, "compute_s": 1.0, "blocked_s": 0.0, "comm_s": 0.5, "utilization": 1.0}]},
             {"worker_id": "rank1", "spans": [
                 {"round": 0.0, "wall_s": 4.0, "compute_s": 1.0, "blocked_s": 3.0, "comm_s": 2.5,
                  "utilization": 0.25}]}]
    rows = span_rows(ranks)
    assert [r["round"] for r in rows] == [0, 1]
    assert rows[0]["wall_s"] == 3.0 and rows[0]["blocked_s"] == 2.0 and rows[0]["comm_s"] == 2.0
    assert rows[0]["compute_utilization"] == 0.375
    assert rows[0]["utilization_per_worker"] == {"rank0": 0.5, "rank1": 0.25}
    assert rows[1]["utilization_per_worker"] == {"rank0": 1.0}


def test_no_utilization_plot_without_span_times(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"event": "eval", "step": 0, "eval_loss": 4.0}) + "\n")
    assert plot_utilization(tmp_path) is None and not (tmp_path / "utilization.png").exists()


def test_gossip_rounds_draw_consensus_png_and_their_evals_sit_on_the_loss_curve(tmp_path: Path) -> None:
    rows = [{"event": "round", "round": r, "train_loss": 4.0 - r, "eval_loss": 4.2 - r if r == 0 else None,
             "loss_per_worker": {"w0": 4.0 - r, "w1": 4.1 - r}, "consensus_distance": 1.0 / (r + 1),
             "tokens": 100 * (r + 1), "bytes_total_per_worker": 10 * (r + 1)} for r in range(3)]
    rows.append({"event": "final", "round": 3, "eval_loss": 1.5, "consensus_distance": None, "tokens": 300,
                 "bytes_total_per_worker": 30})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [r["round"] for r in consensus_rows(tmp_path)] == [0, 1, 2]  # the final row is not a round
    path = plot_consensus(tmp_path)
    assert path == tmp_path / "consensus.png" and path.stat().st_size > 0
    summary = {"final_eval_loss": 1.5, "tokens": 300, "bytes_total_per_worker": 30.0}
    assert eval_curve(tmp_path, summary) == [(0.0, 0.0, 4.2), (300.0, 30.0, 1.5)]


def test_no_consensus_plot_for_a_run_without_gossip_rounds(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"event": "round", "round": 0, "tokens": 1}) + "\n")
    assert plot_consensus(tmp_path) is None and not (tmp_path / "consensus.png").exists()
