"""4-worker SparseLoCo and EControl runs over gRPC, real processes on loopback."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import tiny_config
from tests.integration.procs import finish, start_coordinator, start_worker, write_recipe
from worker.data import load_corpus
from worker.model import GPT

# Upper bound on bytes sent per worker per round, as a fraction of one dense float32 model: the payload
# (~1.8% for SparseLoCo, ~14% for top-10% values + indices) plus per-tensor headers and heartbeats.
WIRE_FRACTION = {"sparseloco": 0.15, "econtrol": 0.35}
# Upper bounds on the downlink, same unit. SparseLoCo's is sparse: the other senders' updates relayed, or
# the union of their coordinates, whichever is smaller. Per round, the aggregate's component bytes (4
# senders x ~0.9% here) and the bytes a worker received (those plus one spec per tensor and sender, which
# dominate on this 16k-parameter model: ~16%, and the replies to its long-polls and heartbeats). Before,
# every worker pulled the dense model every round (1.0 and more).
DOWNLINK_FRACTION = {"sparseloco": 0.1}
RECEIVED_FRACTION = {"sparseloco": 0.25}
PROTOCOLS: dict[str, dict[str, Any]] = {
    # top-64 of each 4096 chunk, 2-bit values, 12-bit indices, EF decay 0.95
    "sparseloco": {"kind": "sparseloco", "inner_steps": 5},
    # every step's update, top-10% under EControl error feedback
    "econtrol": {"kind": "econtrol", "inner_steps": 1},
}


@pytest.mark.parametrize("kind", sorted(PROTOCOLS))
def test_four_worker_compressed_run_lowers_eval_loss(tmp_path: Path, kind: str) -> None:
    cfg = tiny_config(name=kind, run_dir=str(tmp_path / "runs"), protocol=PROTOCOLS[kind],
                      cluster={"workers": 4, "round_deadline_s": 120, "heartbeat_interval_s": 0.5})
    coord, address = start_coordinator(write_recipe(cfg, tmp_path / f"{kind}.yaml"), tmp_path)
    workers = [start_worker(address, tmp_path, i) for i in range(4)]
    for i, w in enumerate(workers):
        assert finish(w, 240, tmp_path / f"worker{i}.log") == 0, (tmp_path / f"worker{i}.log").read_text()
    assert finish(coord, 240, tmp_path / "coordinator.log") == 0

    results = [json.loads((tmp_path / f"worker{i}.json").read_text()) for i in range(4)]
    summary = json.loads((tmp_path / "runs" / kind / "summary.json").read_text())
    assert all(r["rounds"] == cfg.rounds for r in results)
    assert all(r["state_hashes"] == results[0]["state_hashes"] for r in results)
    assert results[0]["state_hashes"][-1] == summary["state_hash"]
    assert [r["resyncs"] for r in results] == [0] * 4 and summary["resyncs"] == 0
    metrics = [json.loads(line) for line in (tmp_path / "runs" / kind / "metrics.jsonl").read_text().splitlines()]
    rounds = [r for r in metrics if r["event"] == "round"]
    assert len(rounds) == cfg.rounds and all(len(r["workers"]) == 4 for r in rounds)
    assert all(r["final_eval_loss"] < rounds[0]["eval_loss"] - 0.05 for r in results)

    # What crossed the wire is the compressed payload, far below one dense model per round.
    vocab = load_corpus(cfg.data.eval_fraction, cfg.data.max_chars).tokenizer.vocab_size
    model_bytes = 4 * sum(p.numel() for p in GPT(cfg.model, vocab).parameters())
    sent, received = summary["bytes_sent_per_worker"], summary["bytes_received_per_worker"]
    # The coordinator counts the initial state one worker offered (a dense model) in that worker's bytes.
    assert 0 < sent < WIRE_FRACTION[kind] * model_bytes * cfg.rounds + (model_bytes + 4096) / 4
    assert received > 0 and summary["bytes_total_per_worker"] == sent + received
    # Each worker's own count, of every message it sent or received: the one that offered the initial
    # state also sent one dense model (plus its specs) once.
    assert all(r["bytes_total"] == r["bytes_sent"] + r["bytes_received"] for r in results)
    uplink = sorted(r["bytes_sent"] for r in results)
    assert uplink[-2] < WIRE_FRACTION[kind] * model_bytes * cfg.rounds
    assert uplink[-1] < WIRE_FRACTION[kind] * model_bytes * cfg.rounds + model_bytes + 4096
    if kind in DOWNLINK_FRACTION:
        # The downlink is compressed too: no worker received anything near a dense model per round.
        assert all(r["downlink_bytes"] < DOWNLINK_FRACTION[kind] * model_bytes for r in rounds)
        assert received < RECEIVED_FRACTION[kind] * model_bytes * cfg.rounds
        assert all(r["bytes_received"] < RECEIVED_FRACTION[kind] * model_bytes * cfg.rounds for r in results)
