"""What a person sees of a run, without sockets: the status reply built from the state machine (eval loss as it
comes, speed, link, bytes by kind), the JSON and table of `lowband status`, the final table's byte split, the
worker's traffic counter, the --compare plot and the TensorBoard scalars of a run without a coordinator."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from rich.console import Console
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from compression.payload import dense
from coordinator.errors import Code, Rejected
from coordinator.state import CoordinatorState
from coordinator.status import status_reply
from coordinator.tensorboard import write_eval_scalars
from deploy.report import compare_curves, final_table, plot_compare, traffic_split
from deploy.status import status_dict, status_table
from protocols.base import Update
from protocols.config import PROTOCOL_VERSION
from protocols.registry import build_protocol
from protocols.wire import messages as m
from tests.conftest import tiny_config
from worker.traffic import Traffic


def _request(token: str = "") -> m.StatusRequest:
    return m.StatusRequest(m.Envelope(run_id="", worker_id="", round=0, protocol_version=PROTOCOL_VERSION,
                                      token=token))


def _state(token: str = "") -> tuple[CoordinatorState, list[str]]:
    cfg = tiny_config(cluster={"workers": 2, "heartbeat_timeout_s": 1000.0, "token": token})
    state = CoordinatorState(cfg, build_protocol(cfg), clock=lambda: 5.0)
    joined = [state.join_session(f"host{i}", token, PROTOCOL_VERSION) for i in range(2)]
    ids = [member.worker_id for member, _ in joined]
    state.offer_initial_state(ids[0], joined[0][1], {"w": dense(torch.ones(4))}, wire_bytes=100)
    return state, ids


def test_status_shows_each_workers_round_eval_loss_speed_link_and_bytes_by_kind() -> None:
    state, ids = _state()
    metrics = {"train_loss": 2.5, "eval_loss": 3.25, "tokens": 512.0, "wall_s": 2.0, "link_bandwidth_mbps": 10.0,
               "link_latency_ms": 50.0}
    state.submit(ids[0], "", 0, Update({"w": dense(torch.zeros(4))}), metrics, 40)
    state.count_download(ids[0], 30)
    state.count_control(ids[1], 7, 9)
    reply = status_reply(state, _request())
    assert (reply.name, reply.protocol, reply.phase, reply.round) == ("tiny", "diloco", m.Phase.TRAINING, 0)
    first, second = reply.workers
    # The eval loss an update reports is shown at once (no heartbeat carried it): the live view needs no end.
    assert (first.worker_id, first.round, first.eval_loss, first.tokens) == (ids[0], 1, 3.25, 512)
    assert first.tokens_per_s == 256.0 and first.link == "10 Mbit/s, 50 ms"
    assert (first.protocol_sent, first.state_sent, first.protocol_received) == (40, 100, 30)
    assert (second.round, second.link, second.control_sent, second.control_received) == (0, "", 7, 9)
    assert math.isnan(second.eval_loss) and math.isnan(second.tokens_per_s)
    members = {mb.worker_id: mb for mb in state.members_copy()}
    assert members[ids[0]].bytes_sent == 140 and members[ids[1]].bytes_received == 9
    with pytest.raises(ValueError, match="a download is 'protocol' or 'state' traffic, not 'control'"):
        state.count_download(ids[0], 5, "control")  # control bytes come with both directions: count_control
    assert [mb.bytes_received for mb in state.members_copy()] == [30, 9]

    shown = status_dict(reply)
    rows = {w["worker_id"]: w for w in shown["workers"]}
    assert rows[ids[0]]["bytes_sent"] == 140 and rows[ids[0]]["bytes_received"] == 30
    assert rows[ids[1]]["eval_loss"] is None and rows[ids[1]]["link"] is None and rows[ids[1]]["loss"] is None
    console = Console(record=True, width=250)
    console.print(status_table(shown))
    text = console.export_text()
    assert "10 Mbit/s, 50 ms" in text and "3.2500" in text and "256" in text and ids[1] in text


def test_status_needs_the_runs_token_and_changes_nothing() -> None:
    state, _ = _state(token="s3cret")
    with pytest.raises(Rejected) as info:
        status_reply(state, _request("wrong"))
    assert info.value.code is Code.UNAUTHENTICATED
    assert len(status_reply(state, _request("s3cret")).workers) == 2


def test_traffic_sums_its_kinds_and_refuses_an_unknown_one() -> None:
    traffic = Traffic()
    traffic.add("protocol", sent=10, received=20)
    traffic.add("control", sent=1)
    traffic.add("state", received=300)
    assert (traffic.sent, traffic.received) == (11, 320)
    with pytest.raises(ValueError, match="traffic kind 'heartbeat' is none of protocol, control, state"):
        traffic.add("heartbeat", sent=1)
    assert traffic.sent == 11


def test_final_table_separates_protocol_control_and_state_bytes_both_ways() -> None:
    ddp = {"name": "base-ddp", "protocol": "ddp", "tokens": 1e6, "bytes_sent_per_worker": 8e6,
           "bytes_received_per_worker": 8e6, "wall_s": 10}
    split = {"protocol_sent": 68e3, "protocol_received": 132e3, "control_sent": 5e3, "control_received": 2e3,
             "state_sent": 822e3, "state_received": 0.0}
    sparse = {"name": "base", "protocol": "sparseloco", "tokens": 1e6, "final_eval_loss": 2.5,
              "bytes_sent_per_worker": 895e3, "bytes_received_per_worker": 134e3, "traffic_per_worker": split,
              "wall_s": 12}
    assert traffic_split(ddp)["protocol_sent"] == 8e6 and traffic_split(ddp)["control_sent"] == 0.0
    console = Console(record=True, width=250)
    console.print(final_table([ddp, sparse]))
    text = console.export_text()
    assert "68.0 KB / 132.0 KB" in text  # protocol: updates up / aggregates down
    assert "5.0 KB / 2.0 KB" in text and "822.0 KB / 0.0 B" in text and "895.0 KB / 134.0 KB" in text
    assert "80.0x fewer" in text  # protocol bytes both ways against DDP's: 16 MB / 200 KB


def test_compare_draws_both_runs_in_one_png(tmp_path: Path) -> None:
    runs = []
    for name, losses in (("a", (4.0, 3.0)), ("b", (4.0, 3.5))):
        run_dir = tmp_path / name
        run_dir.mkdir()
        rows = [{"event": "round", "round": r, "eval_loss": loss, "tokens": 100 * (r + 1),
                 "bytes_total_per_worker": 10.0 * (r + 1)} for r, loss in enumerate(losses)]
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        runs.append({"name": name, "protocol": "diloco", "run_dir": str(run_dir), "final_eval_loss": None})
    assert compare_curves(runs) == {"a (diloco)": [(0.0, 0.0, 4.0), (100.0, 10.0, 3.0)],
                                    "b (diloco)": [(0.0, 0.0, 4.0), (100.0, 10.0, 3.5)]}
    out = plot_compare(runs, tmp_path / "compare.png")
    assert out == tmp_path / "compare.png" and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_runs_without_a_coordinator_get_their_eval_points_as_scalars(tmp_path: Path) -> None:
    points = [{"step": 0, "eval_loss": 4.5, "bytes_sent": 0}, {"step": 10, "eval_loss": 3.0, "train_loss": 3.1,
                                                                "bytes_sent": 800, "bytes_received": 800}]
    assert write_eval_scalars(tmp_path, points)
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("loss/eval")] == [(0, 4.5), (10, 3.0)]
    assert [e.step for e in acc.Scalars("loss/train")] == [10]
    assert [e.value for e in acc.Scalars("bytes_per_worker/received")] == [0.0, 800.0]
