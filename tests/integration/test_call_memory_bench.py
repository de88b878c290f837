"""bench.call_memory on 100 units of each: a real gRPC server and client process on loopback, and threads in fresh
processes. What its table rests on is checked with margins far from the measured values (BENCHMARKS.md), not
its numbers: a held call and a thread cost a stack each, an idle connection does not, and a thread that ran torch
keeps per-thread state in malloc that a plain thread does not."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import bench.common
from bench.call_memory import COLUMNS, main


def test_each_contender_is_measured_and_the_threads_are_what_costs(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench.common, "RESULTS", tmp_path)
    main(["--count", "100", "--out", "calls"])
    doc = json.loads((tmp_path / "calls.json").read_text())
    rows = {r["contender"]: r for r in doc["rows"]}
    assert list(rows) == ["idle-connection", "held-call", "thread", "thread-after-torch"]
    assert all(set(COLUMNS) <= set(r) and r["count"] == 100 for r in rows.values())
    idle, held, plain, torch_thread = (rows[k] for k in rows)
    assert idle["threads_added"] < 20 <= 100 <= held["threads_added"]  # a pool thread per open call (all at once)
    assert plain["threads_added"] == torch_thread["threads_added"] == 100
    assert idle["thread_stacks_kb_per_unit"] < 1 < held["thread_stacks_kb_per_unit"]
    assert held["rss_kb_per_unit"] > idle["rss_kb_per_unit"] + 15
    assert torch_thread["malloc_in_use_kb_per_unit"] > plain["malloc_in_use_kb_per_unit"] + 10


def test_a_count_below_one_is_refused() -> None:
    with pytest.raises(SystemExit):
        main(["--count", "0"])
