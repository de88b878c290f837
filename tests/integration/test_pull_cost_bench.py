"""bench.pull_cost --quick: a real coordinator on loopback and a client process pulling one round's aggregate
again and again. Checked: the rows the table rests on, and that the aggregate's bytes, sent serialized once for
every pull, are counted alike by the clients and the coordinator, both ways. No timing thresholds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import bench.common
from bench.pull_cost import main


def test_quick_run_measures_pulls_and_counts_their_bytes_both_ends(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench.common, "RESULTS", tmp_path)
    main(["--quick", "--pulls", "4", "--workers", "3", "--out", "pulls"])
    doc = json.loads((tmp_path / "pulls.json").read_text())
    rows = {r["phase"]: r["per_pull_ms"] for r in doc["rows"]}
    assert sorted(rows) == ["encode_once", "server_cpu", "wall"]
    assert all(v > 0 for v in rows.values())
    assert doc["messages_per_pull"] >= 2  # a header and the chunks
    clients, coordinator = doc["clients_counted"], doc["coordinator_counted"]
    assert clients["sent"] > 0 and clients["received"] > clients["sent"]  # requests out, aggregates in
    assert coordinator == clients  # both ends count every byte alike, both ways
    assert doc["pullers"] == 3  # 4 pulls from 3 members
    assert doc["bytes_total_per_worker"] == pytest.approx((clients["sent"] + clients["received"]) / 3)
    assert doc["bytes_sent_per_pull"] == pytest.approx(clients["sent"] / 4)
    assert doc["bytes_received_per_pull"] == pytest.approx(clients["received"] / 4)
