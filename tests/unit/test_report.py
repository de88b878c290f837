"""The loss curve places each evaluation at the tokens and bytes spent before it."""

from __future__ import annotations

import json
from pathlib import Path

from deploy.report import eval_curve


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
