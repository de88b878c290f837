"""`lowband status` against a live coordinator on loopback (real processes), and what the run leaves: the
byte split of summary.json, which reconciles with the totals and keeps heartbeats out of the protocol bytes,
and the TensorBoard scalars in the run directory."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from coordinator.traffic import TRAFFIC_KEYS
from deploy.status import fetch_status
from tests.conftest import tiny_config
from tests.integration.procs import LOWBAND, finish, start_coordinator, start_worker, wait_for, write_recipe

TOKEN = "s3cret"
ROUNDS = 4


def _status(address: str, *extra: str) -> subprocess.Popen[str]:
    env = {**os.environ, "COLUMNS": "250"}  # wide enough that the table's cells are not cut
    return subprocess.Popen([*LOWBAND, "status", address, *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env)


def _output(proc: subprocess.Popen[str]) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=120)
    return proc.returncode, out


def _mid_run(address: str) -> bool:
    status = fetch_status(address, TOKEN)
    return status.round >= 1 and len(status.workers) == 2


def test_status_lists_every_live_worker_and_the_run_splits_its_bytes(tmp_path: Path) -> None:
    cfg = tiny_config(name="statustiny", run_dir=str(tmp_path / "runs"),
                      train={"steps": 5 * ROUNDS, "lr": 1e-2, "warmup_steps": 2, "eval_batches": 2,
                             "eval_every_steps": 5},
                      link={"bandwidth_mbps": 1000.0, "latency_ms": 1.0},
                      cluster={"workers": 2, "round_deadline_s": 60, "heartbeat_interval_s": 0.1, "token": TOKEN})
    recipe = write_recipe(cfg, tmp_path / "statustiny.yaml")
    coord, address = start_coordinator(recipe, tmp_path)
    # Slow steps keep the run going for several seconds after round 1, while `lowband status` asks.
    workers = [start_worker(address, tmp_path, i, "--token", TOKEN, "--step-delay", "1.0") for i in range(2)]
    wait_for(lambda: _mid_run(address), 180, "round 1 with both workers")

    # All three at once, while the run is live (each is a fresh process that takes a while to start).
    asked = [_status(address, "--json", "--token", TOKEN), _status(address, "--token", TOKEN),
             _status(address, "--json")]
    (listed_rc, listed), (table_rc, table), (refused_rc, refused) = (_output(p) for p in asked)
    assert listed_rc == 0, listed
    status = json.loads(listed)
    assert status["name"] == "statustiny" and status["protocol"] == "diloco" and status["rounds"] == ROUNDS
    assert status["phase"] == "training" and status["round"] >= 1
    rows = {w["worker_id"]: w for w in status["workers"]}
    assert set(rows) == {"w0", "w1"}
    for w in rows.values():
        assert w["alive"] is True and w["round"] >= 1 and w["inner_step"] >= 5
        assert w["loss"] > 0 and w["eval_loss"] > 0  # evaluated at round 0's start: shown as it came
        assert w["tokens"] >= 5 * 8 * 32 and w["tokens_per_s"] > 0
        assert w["link"] == "1000 Mbit/s, 1 ms"
        assert w["protocol_sent"] > 0 and w["protocol_received"] >= 0 and w["control_sent"] > 0
        # Seeded alike, the second worker's fresh replica already matched the uploaded one: no pull.
        assert w["state_received"] == 0 and w["resyncs"] == 0
        assert w["bytes_sent"] == w["protocol_sent"] + w["control_sent"] + w["state_sent"]
        assert w["bytes_received"] == w["protocol_received"] + w["control_received"] + w["state_received"]
    # The initial state went up once, from the one worker asked to offer it.
    assert sorted(w["state_sent"] > 0 for w in rows.values()) == [False, True]

    assert table_rc == 0, table
    for text in ("w0", "w1", "tokens/s", "eval loss", "1000 Mbit/s, 1 ms", "protocol sent / recv", "statustiny"):
        assert text in table, (text, table)
    assert refused_rc == 1 and "UNAUTHENTICATED" in refused  # the run has a token: no status without it

    for i, w in enumerate(workers):
        assert finish(w, 300, tmp_path / f"worker{i}.log") == 0, (tmp_path / f"worker{i}.log").read_text()
    assert finish(coord, 300, tmp_path / "coordinator.log") == 0
    run_dir = tmp_path / "runs" / "statustiny"
    _check_byte_split(run_dir, tmp_path)
    _check_tensorboard(run_dir)


def _check_byte_split(run_dir: Path, tmp_path: Path) -> None:
    summary = json.loads((run_dir / "summary.json").read_text())
    results = {r["worker_id"]: r for r in (json.loads((tmp_path / f"worker{i}.json").read_text()) for i in range(2))}
    split = summary["traffic_per_worker"]
    assert sum(split[f"{k}_sent"] for k in ("protocol", "control", "state")) == pytest.approx(
        summary["bytes_sent_per_worker"])
    assert sum(split[f"{k}_received"] for k in ("protocol", "control", "state")) == pytest.approx(
        summary["bytes_received_per_worker"])
    for worker_id, row in summary["workers"].items():
        coordinator_side: dict[str, Any] = row["traffic"]
        worker_side: dict[str, int] = results[worker_id]["traffic"]
        assert row["bytes_sent"] == sum(coordinator_side[k] for k in TRAFFIC_KEYS if k.endswith("_sent"))
        assert results[worker_id]["bytes_sent"] == sum(worker_side[k] for k in TRAFFIC_KEYS if k.endswith("_sent"))
        # Updates up and the whole replica: both ends counted the very same messages, and nothing else.
        # Heartbeats (every 0.1 s, dozens of them) went to control, never to protocol.
        for key in ("protocol_sent", "state_sent", "state_received"):
            assert coordinator_side[key] == worker_side[key], (worker_id, key)
        assert worker_side["control_sent"] > 0 and coordinator_side["control_sent"] > 0
    # The initial state is no protocol traffic: the protocol moved far less than the dense upload.
    initializer = max(summary["workers"].values(), key=lambda w: w["traffic"]["state_sent"])
    assert initializer["traffic"]["state_sent"] > 0


def _check_tensorboard(run_dir: Path) -> None:
    events = list(run_dir.glob("events.out.tfevents.*"))
    assert events, sorted(p.name for p in run_dir.iterdir())
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    expected = {"loss/train", "loss/eval", "tokens", "bytes_per_worker/sent", "bytes_per_worker/received",
                "round/seconds", *(f"traffic_per_worker/{k}" for k in TRAFFIC_KEYS)}
    assert expected <= tags, tags
    assert [e.step for e in acc.Scalars("loss/train")] == list(range(ROUNDS))
    protocol = [e.value for e in acc.Scalars("traffic_per_worker/protocol_sent")]
    assert protocol == sorted(protocol) and protocol[-1] > 0  # cumulative: only grows
