"""The gossip rendezvous: joins in order, rosters, per-round rows once every live worker reported, and
refusals that name what was wrong and change nothing."""

from __future__ import annotations

import json
import math
import weakref
from collections.abc import Callable
from pathlib import Path

import pytest

from coordinator.errors import Code, Rejected
from coordinator.rendezvous import Joined, Rendezvous
from protocols.config import PROTOCOL_VERSION, RunConfig
from tests.conftest import tiny_config

TOKEN = "secret"


def _cfg(workers: int = 3) -> RunConfig:
    # 10 steps of H = 5: rounds 0 and 1, and round 2 is the final report.
    return tiny_config(protocol={"kind": "gossip", "topology": "ring", "inner_steps": 5},
                       cluster={"workers": workers, "token": TOKEN})


# Each rendezvous' members' sessions, by worker id: every call after the join carries its member's.
SESSIONS: weakref.WeakKeyDictionary[Rendezvous, dict[str, str]] = weakref.WeakKeyDictionary()


def _join(rv: Rendezvous, hostname: str, address: str, name: str = "") -> Joined:
    joined = rv.join(hostname, TOKEN, PROTOCOL_VERSION, address, worker_name=name)
    SESSIONS.setdefault(rv, {})[joined.worker_id] = joined.session
    return joined


def s(rv: Rendezvous, worker_id: str) -> str:
    """The session of member `worker_id`."""
    return SESSIONS[rv][worker_id]


def _joined(rv: Rendezvous, n: int) -> list[str]:
    return [_join(rv, f"host{i}", f"127.0.0.1:{7000 + i}").worker_id for i in range(n)]


def _metrics(loss: float, sent: int, sketch: list[float]) -> dict[str, float]:
    return {"train_loss": loss, "bytes_sent": sent, "bytes_received": 2 * sent, "tokens": 100,
            **{f"sketch.{k}": v for k, v in enumerate(sketch)}}


def test_joins_get_indices_in_order_and_the_roster_lists_every_address() -> None:
    rv = Rendezvous(_cfg())
    joined = [_join(rv, f"h{i}", f"10.0.0.{i}:1") for i in range(3)]
    assert [(j.worker_id, j.index) for j in joined] == [("w0", 0), ("w1", 1), ("w2", 2)]
    assert {j.run_id for j in joined} == {rv.run_id} and "gossip" in joined[0].config_yaml
    roster = rv.roster("w1", s(rv, "w1"), 0)
    assert (roster.round, roster.workers, roster.finished) == (0, 3, False)
    assert roster.addresses == {0: "10.0.0.0:1", 1: "10.0.0.1:1", 2: "10.0.0.2:1"}
    assert rv.members["w1"].round == 0
    # A known name rejoins under its old index, with its new address.
    again = _join(rv, "h9", "10.0.0.9:1", "w1")
    assert again.index == 1 and rv.roster("w0", s(rv, "w0"), 0).addresses[1] == "10.0.0.9:1"


def test_a_row_is_written_once_every_live_worker_reported_its_round(tmp_path: Path) -> None:
    rv = Rendezvous(_cfg(), run_dir=tmp_path)
    ids = _joined(rv, 3)
    rv.report(ids[0], s(rv, ids[0]), 0, _metrics(3.0, 10, [0.0, 0.0]))
    rv.report(ids[1], s(rv, ids[1]), 0, {**_metrics(4.0, 20, [3.0, 0.0]), "eval_loss": 4.5})
    assert rv.rows == []  # w2 has not reported
    rv.report(ids[2], s(rv, ids[2]), 0, _metrics(5.0, 30, [0.0, 3.0]))
    [row] = rv.rows
    assert row["event"] == "round" and row["round"] == 0 and row["workers"] == ids
    assert row["train_loss"] == pytest.approx(4.0) and row["eval_loss"] == 4.5
    assert row["loss_per_worker"] == {"w0": 3.0, "w1": 4.0, "w2": 5.0}
    # Sketches (0,0), (3,0), (0,3): mean (1,1); squared distances 2, 5, 5 -> sqrt(4).
    assert row["consensus_distance"] == pytest.approx(2.0)
    assert row["bytes_sent_per_worker"] == 20 and row["bytes_received_per_worker"] == 40
    assert row["bytes_total_per_worker"] == 60 and row["tokens"] == 300
    written = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert written == [row] and (tmp_path / "config.yaml").exists()


def test_a_worker_that_left_is_not_waited_for_and_the_final_reports_finish_the_run() -> None:
    rv = Rendezvous(_cfg())
    ids = _joined(rv, 3)
    for w in ids[:2]:
        rv.report(w, s(rv, w), 0, _metrics(1.0, 5, [1.0]))
    rv.leave(ids[2], s(rv, ids[2]))
    assert [r["round"] for r in rv.rows] == [0] and rv.rows[0]["workers"] == ids[:2]
    for w in ids[:2]:
        rv.report(w, s(rv, w), 1, _metrics(0.5, 9, [1.0]))
    assert not rv.finished() and not rv.roster(ids[0], s(rv, ids[0]), 1).finished
    rv.report(ids[0], s(rv, ids[0]), 2, {"eval_loss": 2.0, "bytes_sent": 12})
    rv.report(ids[1], s(rv, ids[1]), 2, {"eval_loss": 3.0, "bytes_sent": 12})
    assert rv.finished() and rv.wait_finished(0.0)
    assert [r["event"] for r in rv.rows] == ["round", "round", "final"]
    assert rv.rows[1]["consensus_distance"] == 0.0  # identical sketches
    assert rv.rows[-1]["consensus_distance"] is None and rv.rows[-1]["eval_loss"] == 2.5  # no sketch in finals
    summary = rv.summary()
    assert summary["rounds"] == 2 and summary["final_eval_loss"] == 2.5
    assert summary["bytes_sent_per_worker"] == pytest.approx((12 + 12 + 0) / 3)
    assert not summary["workers"]["w2"]["alive"]


def test_silent_workers_are_dropped_by_the_ticker() -> None:
    now = [0.0]
    rv = Rendezvous(_cfg(2), clock=lambda: now[0])
    ids = _joined(rv, 2)
    rv.report(ids[0], s(rv, ids[0]), 0, _metrics(1.0, 1, [0.0]))
    now[0] = 31.0  # past cluster.heartbeat_timeout_s (4 by default)
    rv.heartbeat(ids[0], s(rv, ids[0]), step=5, loss=1.0)
    rv.tick()
    assert not rv.members["w1"].alive and rv.members["w0"].alive and [r["round"] for r in rv.rows] == [0]


@pytest.mark.parametrize(
    ("call", "code", "match"),
    [
        (lambda rv: rv.join("h", "wrong", PROTOCOL_VERSION, ""), Code.UNAUTHENTICATED, "bad token"),
        (lambda rv: rv.join("h", TOKEN, PROTOCOL_VERSION + 1, ""), Code.FAILED_PRECONDITION, "protocol version"),
        (lambda rv: rv.join("h", TOKEN, PROTOCOL_VERSION, ""), Code.FAILED_PRECONDITION,
         r"already has its 3 workers \(cluster.workers\)"),
        (lambda rv: rv.roster("w7", s(rv, "w0"), 0), Code.UNAUTHENTICATED, "not the session of worker 'w7'"),
        (lambda rv: rv.roster("w0", TOKEN, 0), Code.UNAUTHENTICATED, "bad token"),  # the run's: for joins only
        (lambda rv: rv.roster("w0", s(rv, "w1"), 0), Code.UNAUTHENTICATED, "bad token"),
        (lambda rv: rv.roster("w0", "wrong", 0), Code.UNAUTHENTICATED, "bad token"),
        (lambda rv: rv.roster("w0", s(rv, "w0"), 3), Code.INVALID_ARGUMENT, r"named round 3; this run has rounds 0..1"),
        (lambda rv: rv.report("w0", s(rv, "w0"), -1, {}), Code.INVALID_ARGUMENT, "named round -1"),
        (lambda rv: rv.report("w0", s(rv, "w0"), 0, {"train_loss": math.nan}), Code.INVALID_ARGUMENT,
         r"'train_loss' = nan: metrics must be finite"),
        (lambda rv: rv.report("w0", s(rv, "w0"), 0, {"eval_loss": math.inf}), Code.INVALID_ARGUMENT, "must be finite"),
        (lambda rv: rv.report("w0", s(rv, "w0"), 0, {"bytes_sent": -1}), Code.INVALID_ARGUMENT, "counter 'bytes_sent'"),
        (lambda rv: rv.report("w0", s(rv, "w0"), 0, {"sketch.0": 1.0, "sketch.2": 1.0}), Code.INVALID_ARGUMENT,
         "sketch keys must be"),
        (lambda rv: rv.report("w1", s(rv, "w1"), 0, {"sketch.0": 1.0, "sketch.1": 1.0}), Code.INVALID_ARGUMENT,
         "the others of this round have"),
        (lambda rv: rv.report("w2", s(rv, "w2"), 0, {}), Code.ALREADY_EXISTS, "already reported round 0"),
    ],
)
def test_refusals_say_what_was_wrong_and_change_nothing(call: Callable[[Rendezvous], object], code: Code,
                                                        match: str) -> None:
    rv = Rendezvous(_cfg())
    _joined(rv, 3)
    rv.report("w2", s(rv, "w2"), 0, {"sketch.0": 1.0})
    before = ([dataclass_state(p) for p in rv.members_copy()], list(rv.rows))
    with pytest.raises(Rejected, match=match) as err:
        call(rv)
    assert err.value.code is code
    assert ([dataclass_state(p) for p in rv.members_copy()], list(rv.rows)) == before


def dataclass_state(peer: object) -> dict[str, object]:
    state = dict(vars(peer))
    state.pop("last_seen")  # any authenticated call is proof of life, refused or not
    return state


def test_a_stale_round_is_refused_once_its_row_was_written() -> None:
    rv = Rendezvous(_cfg(2))
    ids = _joined(rv, 2)
    rv.report(ids[0], s(rv, ids[0]), 0, {})
    rv.leave(ids[1], s(rv, ids[1]))  # round 0 closes without w1
    _join(rv, "h", "", ids[1])
    with pytest.raises(Rejected, match="stale round: worker w1 reported round 0"):
        rv.report(ids[1], s(rv, ids[1]), 0, {})


def test_a_lost_report_does_not_hold_its_rounds_row_up_once_the_worker_reported_a_later_round() -> None:
    rv = Rendezvous(_cfg(2))
    ids = _joined(rv, 2)
    rv.report(ids[0], s(rv, ids[0]), 0, _metrics(1.0, 1, [0.0]))
    assert rv.rows == []
    rv.report(ids[1], s(rv, ids[1]), 1, _metrics(2.0, 2, [1.0]))  # w1's report of round 0 never came
    assert [(r["round"], r["workers"]) for r in rv.rows] == [(0, ["w0"])]
    rv.report(ids[0], s(rv, ids[0]), 1, _metrics(1.5, 2, [0.0]))
    assert [(r["round"], r["workers"]) for r in rv.rows] == [(0, ["w0"]), (1, ["w0", "w1"])]


def test_a_node_whose_frozen_base_differs_is_refused() -> None:
    rv = Rendezvous(_cfg())
    a, b, c = _joined(rv, 3)
    assert rv.attest_base(a, s(rv, a), "1" * 64) == rv.attest_base(b, s(rv, b), "1" * 64) == "1" * 64
    with pytest.raises(Rejected) as err:
        rv.attest_base(c, s(rv, c), "2" * 64)
    assert err.value.code is Code.FAILED_PRECONDITION and rv.base_digest == "1" * 64
