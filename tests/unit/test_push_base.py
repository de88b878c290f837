"""A push is tied to the state it was computed from (issue 12): `Update.base`, the digest of the replica the
worker trained against, must be the state its round started from (under CO2's overlap, also the state the round
before started from); any other base is refused as a stale round and folds nothing."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from compression.payload import dense
from coordinator.errors import Code, Rejected
from coordinator.state import CoordinatorState
from protocols.base import Update
from protocols.config import PROTOCOL_VERSION
from protocols.registry import build_protocol
from tests.conftest import tiny_config


def _started(overlap: bool) -> tuple[CoordinatorState, list[str]]:
    protocol = {"kind": "diloco", "inner_steps": 5, **({"overlap": {"enabled": True}} if overlap else {})}
    cfg = tiny_config(protocol=protocol, cluster={"workers": 2, "round_deadline_s": 1000.0}, train__steps=25)
    state = CoordinatorState(cfg, build_protocol(cfg))
    ids = [state.join("host", "", PROTOCOL_VERSION).worker_id for _ in range(2)]
    state.offer_initial_state(ids[0], "", {"w": dense(torch.ones(3, 2))})
    return state, ids


def _update(base: str, value: float = 0.5) -> Update:
    return Update({"w": dense(torch.full((3, 2), value))}, base=base)


def _close_round(state: CoordinatorState, ids: list[str], round_: int) -> None:
    for worker in ids:
        state.submit(worker, "", round_, _update(state.start_hashes[round_]), {}, 10)
    assert state.round == round_ + 1


def test_an_update_of_another_state_is_refused_as_stale_and_folds_nothing() -> None:
    state, ids = _started(overlap=False)
    start = state.state_hash
    assert state.start_hashes[0] == start
    with pytest.raises(Rejected) as info:
        state.check_push(ids[0], "", 0, False, "f" * 64)  # from the header, before any payload
    assert info.value.code is Code.FAILED_PRECONDITION and str(info.value).startswith("stale round")
    with pytest.raises(Rejected):
        state.submit(ids[0], "", 0, _update("f" * 64), {}, 10)
    assert state.aggregator is not None and state.aggregator.senders == [] and state.state_hash == start
    state.submit(ids[0], "", 0, _update(start), {}, 10)  # the round's own start state: folded
    state.submit(ids[1], "", 0, _update(""), {}, 10)  # no base stated: not judged
    assert state.round == 1 and state.start_hashes[1] == state.state_hash != start


def test_after_a_round_closed_only_the_new_start_state_is_a_valid_base_without_overlap() -> None:
    state, ids = _started(overlap=False)
    first = state.start_hashes[0]
    _close_round(state, ids, 0)
    with pytest.raises(Rejected, match="stale round"):
        state.submit(ids[0], "", 1, _update(first), {}, 10)  # trained from round 0's state for round 1
    state.submit(ids[0], "", 1, _update(state.start_hashes[1]), {}, 10)


def test_under_overlap_the_one_round_stale_start_is_a_valid_base_and_an_older_one_is_not() -> None:
    state, ids = _started(overlap=True)
    first = state.start_hashes[0]
    _close_round(state, ids, 0)
    _close_round(state, ids, 1)
    with pytest.raises(Rejected, match="stale round"):
        state.submit(ids[0], "", 2, _update(first), {}, 10)  # two rounds stale: CO2 allows one
    state.submit(ids[0], "", 2, _update(state.start_hashes[1]), {}, 10)  # CO2: round 2 trains from round 1's start
    state.submit(ids[1], "", 2, dataclasses.replace(_update(""), base=state.start_hashes[2]), {}, 10)
    assert state.round == 3
