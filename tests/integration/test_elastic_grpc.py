"""Elastic membership over real gRPC with real `lowband` processes (issue 12): a run of `cluster.workers = 2`
takes a third worker mid-run (within `cluster.max_workers = 3`); it sits out the round it joined in, then the
plays are dealt again over all three at the next round boundary, every worker re-shards there, and no play is
trained by two workers in any round. Rounds never wait for the joiner (each closes with every dealt worker)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from deploy.status import fetch_status
from tests.conftest import tiny_config
from tests.integration.procs import PROC_TOKEN, finish, start_coordinator, start_worker, wait_for, write_recipe
from worker.data import load_corpus

ROUNDS = 12


def _shard_at(result: dict[str, Any], round_: int) -> tuple[int, frozenset[str]] | None:
    """The (shard, plays) a worker trained round `round_` on: its latest deal at or before that round."""
    dealt = [d for d in result["deals"] if d["round"] <= round_]
    if not dealt or round_ in result["sat_out"]:
        return None
    return dealt[-1]["shard"], frozenset(dealt[-1]["plays"])


def test_a_worker_joins_mid_run_sits_one_round_out_and_the_plays_are_dealt_again(tmp_path: Path) -> None:
    cfg = tiny_config(name="elastic", run_dir=str(tmp_path / "runs"), data={"batch_size": 8, "max_chars": 60_000,
                                                                            "split": "by_play"},
                      train={"steps": 5 * ROUNDS, "lr": 1e-2, "warmup_steps": 2, "eval_batches": 2,
                             "eval_every_steps": 25},
                      cluster={"workers": 2, "elastic": True, "max_workers": 3, "round_deadline_s": 120,
                               "heartbeat_interval_s": 0.2})
    recipe = write_recipe(cfg, tmp_path / "elastic.yaml")
    coord, address = start_coordinator(recipe, tmp_path)
    # Slow steps keep the rounds going while the third process starts.
    first = [start_worker(address, tmp_path, i, "--step-delay", "0.4") for i in range(2)]
    wait_for(lambda: fetch_status(address, PROC_TOKEN).round >= 1, 180, "round 1")
    joiner = start_worker(address, tmp_path, 2, "--step-delay", "0.4")
    for i, proc in enumerate([*first, joiner]):
        assert finish(proc, 300, tmp_path / f"worker{i}.log") == 0, (tmp_path / f"worker{i}.log").read_text()[-3000:]
    assert finish(coord, 120, tmp_path / "coordinator.log") == 0
    results = [json.loads((tmp_path / f"worker{i}.json").read_text()) for i in range(3)]

    late = results[2]
    dealt_from = late["deals"][0]["round"]  # the first round opened after it joined
    assert 2 <= dealt_from < ROUNDS and late["deals"][0]["shards"] == 3, late["deals"]
    # It sat out the round it joined in, unless that round had closed before it first asked (it joins, builds
    # its session, then pulls the state: a round may close meanwhile).
    assert late["sat_out"] in ([], [dealt_from - 1]) and late["rounds"] == ROUNDS - dealt_from
    for early in results[:2]:  # dealt 2 ways at round 0, then 3 ways from the round after the join
        assert [(d["round"], d["shards"]) for d in early["deals"]] == [(0, 2), (dealt_from, 3)], early["deals"]
        assert early["sat_out"] == [] and early["rounds"] == ROUNDS

    every_play = set(load_corpus(max_chars=60_000).plays)
    for round_ in range(ROUNDS):
        trained = [s for r in results if (s := _shard_at(r, round_)) is not None]
        assert len(trained) == (2 if round_ < dealt_from else 3)
        assert len({shard for shard, _ in trained}) == len(trained)
        plays = [p for _, p in trained]
        assert sum(len(p) for p in plays) == len(every_play) and set().union(*plays) == every_play, round_

    rows = [json.loads(line) for line in (tmp_path / "runs" / "elastic" / "metrics.jsonl").read_text().splitlines()]
    closed = [row for row in rows if row.get("event") == "round"]
    assert len(closed) == ROUNDS and {row["closed_by"] for row in closed} == {"all"}
    assert [len(row["workers"]) for row in closed] == [2] * dealt_from + [3] * (ROUNDS - dealt_from)
