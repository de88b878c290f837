"""Elastic membership (issue 12, coordinator/deal.py): joins past `cluster.workers` up to `cluster.max_workers`,
shards dealt again at round boundaries over the members then alive, a mid-round joiner dealt nothing until
the next round, and no shard trained by two workers in one round. The state machine runs for real, in process."""

from __future__ import annotations

import re
import threading
import time
from dataclasses import replace
from typing import Any

import pytest
import torch

from compression.payload import dense
from coordinator.deal import NOT_DEALT, Deal, next_deal
from coordinator.errors import Code, Rejected
from coordinator.state import CoordinatorState
from protocols.base import Update
from protocols.config import PROTOCOL_VERSION, ConfigError, parse_config
from protocols.registry import build_protocol
from tests.conftest import tiny_config
from worker.data import load_corpus
from worker.loop import RoundLoop
from worker.session import Session
from worker.transports.inproc import InprocTransport


def _state(elastic: bool, workers: int = 2, max_workers: int | None = 3, min_workers: int | None = None
           ) -> CoordinatorState:
    cluster = {"workers": workers, "heartbeat_timeout_s": 1000.0, "round_deadline_s": 1000.0, "elastic": elastic,
               "min_workers": min_workers}
    if elastic:
        cluster["max_workers"] = max_workers
    cfg = tiny_config(cluster=cluster, train={"steps": 30})  # 6 rounds of 5 inner steps
    return CoordinatorState(cfg, build_protocol(cfg))


def _join(state: CoordinatorState, name: str = "") -> str:
    return state.join("host", "", PROTOCOL_VERSION, name).worker_id


def _push(state: CoordinatorState, worker: str, round_: int) -> None:
    state.submit(worker, "", round_, Update({"w": dense(torch.full((3, 2), 0.1))}), {"tokens": 1.0}, 10)


def _started(state: CoordinatorState, workers: int = 2) -> list[str]:
    ids = [_join(state) for _ in range(workers)]
    state.offer_initial_state(ids[0], "", {"w": dense(torch.ones(3, 2))})
    return ids


def test_the_deal_keeps_its_epoch_while_the_members_stay_and_moves_when_they_change() -> None:
    first = next_deal(None, 0, [(1, "w1"), (0, "w0")])
    assert first == Deal(0, ("w0", "w1")) and first.shard_of("w1") == 1 and first.shard_of("w9") == NOT_DEALT
    assert next_deal(first, 3, [(0, "w0"), (1, "w1")]) is first  # same members: same epoch, nobody re-shards
    grown = next_deal(first, 4, [(0, "w0"), (1, "w1"), (2, "w2")])
    assert grown == Deal(4, ("w0", "w1", "w2"))
    assert next_deal(grown, 6, [(0, "w0"), (2, "w2")]) == Deal(6, ("w0", "w2"))  # w2 moves to shard 1


def test_a_deal_answers_every_member_its_join_order_shard_and_equals_by_its_members_alone() -> None:
    ids = tuple(f"w{k}" for k in range(1000))
    deal = Deal(2, ids)
    assert [deal.shard_of(w) for w in ids] == list(range(1000))
    assert "w1000" not in deal and deal.shard_of("w1000") == NOT_DEALT and all(w in deal for w in ids)
    assert deal == Deal(2, ids) and hash(deal) == hash(Deal(2, ids)) and deal != Deal(3, ids)


def test_a_fixed_membership_refuses_a_join_past_workers_and_deals_nothing() -> None:
    state = _state(elastic=False)
    ids = _started(state)
    with pytest.raises(Rejected) as refused:
        _join(state)
    assert refused.value.code is Code.RESOURCE_EXHAUSTED and "cluster.workers = 2" in refused.value.message
    assert [state.shard_for(w) for w in ids] == [(0, 0, 0), (0, 0, 0)]


def test_an_elastic_join_mid_round_sits_the_round_out_and_is_dealt_into_the_next() -> None:
    state = _state(elastic=True)
    w0, w1 = _started(state)
    assert state.round == 0 and state.shard_for(w0) == (0, 0, 2) and state.shard_for(w1) == (0, 1, 2)
    w2 = _join(state)  # past cluster.workers = 2, within max_workers = 3
    assert state.shard_for(w2) == (0, NOT_DEALT, 2)
    with pytest.raises(Rejected) as refused:
        _push(state, w2, 0)
    assert refused.value.code is Code.FAILED_PRECONDITION and "dealt no shard" in refused.value.message
    _push(state, w0, 0)
    _push(state, w1, 0)
    # Round 0 closed on its two dealt workers, without waiting for w2; round 1 is dealt over all three.
    assert state.round == 1 and state.history[-1].closed_by == "all"
    assert [state.shard_for(w) for w in (w0, w1, w2)] == [(1, 0, 3), (1, 1, 3), (1, 2, 3)]
    with pytest.raises(Rejected) as full:
        _join(state)
    assert full.value.code is Code.RESOURCE_EXHAUSTED and "cluster.max_workers = 3" in full.value.message
    for w in (w0, w1, w2):
        _push(state, w, 1)
    assert state.round == 2 and state.shard_for(w2) == (1, 2, 3)  # the same members: the same deal


def test_a_departed_member_is_dealt_out_at_the_next_round_and_its_place_can_be_taken() -> None:
    state = _state(elastic=True, workers=2, max_workers=2, min_workers=1)
    w0, w1 = _started(state)
    state.leave(w1, "")
    _push(state, w0, 0)  # the only dealt worker still here reported: round 0 closes
    assert state.round == 1 and state.shard_for(w0) == (1, 0, 1)  # dealt again over w0 alone
    w2 = _join(state)  # w1's place, taken mid-round: w2 sits round 1 out
    assert state.shard_for(w2) == (1, NOT_DEALT, 1)
    with pytest.raises(Rejected) as refused:
        state.join("host", "", PROTOCOL_VERSION, w1)  # max_workers = 2 are here: w1 cannot come back now
    assert refused.value.code is Code.RESOURCE_EXHAUSTED and "max_workers = 2" in refused.value.message
    _push(state, w0, 1)
    assert state.round == 2 and state.shard_for(w0) == (2, 0, 2) and state.shard_for(w2) == (2, 1, 2)


def test_dealt_by_play_shards_never_share_a_play() -> None:
    corpus = load_corpus(max_chars=60_000)
    for count in (2, 3, 5):
        plays = [set(corpus.shard(k, count, "by_play", 0, stream_keys=(k + 7, 4)).plays) for k in range(count)]
        assert set().union(*plays) == set(corpus.plays)
        assert sum(len(p) for p in plays) == len(corpus.plays)  # disjoint: every play dealt exactly once


def test_elastic_config_errors_name_what_is_wrong() -> None:
    base = tiny_config().model_dump()
    cases = [
        ({"max_workers": 4}, "max_workers is for elastic membership"),
        ({"elastic": True, "workers": 3, "max_workers": 2}, "max_workers (2) cannot be below workers (3)"),
    ]
    for cluster, message in cases:
        with pytest.raises(ConfigError, match=re.escape(message)):
            parse_config({**base, "cluster": {**base["cluster"], **cluster}})
    with pytest.raises(ConfigError, match=r"cluster\.elastic is for protocol\.kind diloco or sparseloco"):
        parse_config({**base, "protocol": {"kind": "econtrol"}, "cluster": {**base["cluster"], "elastic": True}})
    with pytest.raises(ConfigError, match=r"cluster\.elastic needs a coordinator"):
        parse_config({**base, "cluster": {**base["cluster"], "elastic": True, "transport": "allgather"}})


def test_a_worker_loop_that_joins_mid_round_sits_it_out_then_trains_on_its_deal() -> None:
    """A real RoundLoop over the in-process transport joins a two-worker elastic run while round 0 is open:
    it sits round 0 out (pushing nothing), resyncs, and trains rounds 1 and 2 on shard 2 of 3, while the test
    stands in for the other two workers' pushes to the same state machine."""
    cfg = tiny_config(data={"batch_size": 8, "max_chars": 60_000, "split": "by_play"}, train={"steps": 15},
                      cluster={"workers": 2, "elastic": True, "max_workers": 3, "heartbeat_timeout_s": 1000.0,
                               "round_deadline_s": 1000.0})
    protocol = build_protocol(cfg)
    state = CoordinatorState(cfg, protocol)
    params = Session.build(cfg, 0, 2, evaluates=False).params()
    w0, w1 = _join(state), _join(state)
    state.offer_initial_state(w0, "", {n: dense(t) for n, t in params.items()})
    transport = InprocTransport(state)  # joins as w2 while round 0 is open
    loop = RoundLoop(Session.build(cfg, transport.index, 2, evaluates=False), transport, protocol)
    done: list[Any] = []
    thread = threading.Thread(target=lambda: done.append(loop.run()), daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while loop.result.sat_out != [0]:
        assert time.monotonic() < deadline and thread.is_alive(), "the joiner never sat round 0 out"
        time.sleep(0.01)
    zero = Update({n: dense(torch.zeros_like(t)) for n, t in params.items()})
    for round_ in range(3):
        while state.round < round_:
            time.sleep(0.01)
        for worker in (w0, w1):
            state.submit(worker, "", round_, replace(zero, base=state.start_hashes[round_]), {"tokens": 1.0}, 10)
    thread.join(60)
    assert done, "the joiner's loop did not finish"
    result = done[0]
    assert result.sat_out == [0] and result.rounds == 2 and result.resyncs == 1
    assert [(d["round"], d["shard"], d["shards"]) for d in result.deals] == [(1, 2, 3)]
    assert [len(r.workers) for r in state.history] == [2, 3, 3]
