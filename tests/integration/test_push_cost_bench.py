"""bench.push_cost --quick: one push's phases in-process, and over gRPC to a real coordinator on loopback.
Checked: a row per phase, every push folded, a push is its header and one message of chunks (TensorChunks), the
server's CPU really measured. No timing thresholds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import bench.common
from bench.push_cost import main


@pytest.mark.parametrize("grpc", [False, True], ids=["in-process", "grpc"])
def test_quick_run_writes_a_row_per_phase(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, grpc: bool) -> None:
    monkeypatch.setattr(bench.common, "RESULTS", tmp_path)
    main(["--quick", "--pushes", "4", "--distinct", "2", "--out", "cost", *(["--grpc"] if grpc else [])])
    doc = json.loads((tmp_path / "cost.json").read_text())
    phases = ["read_push", "check", "fold", "server_cpu", "wall"] if grpc else \
        ["parse", "read_push", "check", "fold", "total"]
    assert [r["phase"] for r in doc["rows"]] == phases
    assert all(r["max_ms"] >= r["median_ms"] >= r["min_ms"] >= 0 for r in doc["rows"])
    assert doc["folded"] == 4 and doc["config"]["malloc_tuning"] is True
    if grpc:
        assert doc["server_cpu_s"] > 0 and doc["wall_s"] > 0
    else:
        assert doc["messages_per_push"] == [2, 2]  # the header, then every chunk in one TensorChunks message
        assert all(n > 0 for n in doc["update_bytes"])
