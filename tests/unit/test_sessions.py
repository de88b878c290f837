"""The coordinator's join rule and sessions (coordinator/sessions.py), on the state machine without sockets: a
join presenting the run's token (or a worker's own) issues a session; every later call must carry that
session, and nothing else (not the run's token, not another member's session, not one a re-join replaced);
the member table and its checkpoint keep only the session's SHA-256 digest."""

from __future__ import annotations

import hashlib

import pytest
import torch

from compression.payload import dense
from coordinator.errors import Code, Rejected
from coordinator.sessions import Gate, digest, matches, new_session
from coordinator.state import CoordinatorState
from protocols.config import PROTOCOL_VERSION
from protocols.registry import build_protocol
from tests.conftest import tiny_config

TOKEN = "the-runs-secret"
WORKER_TOKENS = {"w0": "token-of-w0-0123456789", "w1": "token-of-w1-9876543210"}


def _state(token: str = TOKEN, worker_tokens: dict[str, str] | None = None) -> CoordinatorState:
    cfg = tiny_config(cluster={"workers": 2, "token": token, "heartbeat_timeout_s": 1000.0})
    return CoordinatorState(cfg, build_protocol(cfg), clock=lambda: 1.0, worker_tokens=worker_tokens)


def _refused(call, code: Code = Code.UNAUTHENTICATED) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(Rejected) as err:
        call()
    assert err.value.code is code, err.value.message
    return err.value.message


def test_sessions_are_fresh_random_and_kept_as_sha256_digests() -> None:
    (a, da), (b, db) = new_session(), new_session()
    assert db != da
    assert a != b and len(a) >= 43 and da == hashlib.sha256(a.encode()).hexdigest() == digest(a)
    assert matches(a, da) and not matches(b, da) and not matches("", "") and not matches(a, "")


def test_after_the_join_only_the_members_own_session_is_accepted() -> None:
    state = _state()
    (first, s0), (second, s1) = (state.join_session("h", TOKEN, PROTOCOL_VERSION) for _ in range(2))
    assert s0 != s1 and TOKEN not in (s0, s1)
    assert first.session_digest == digest(s0) and s0 not in repr(state.members)  # the credential is not kept
    state.offer_initial_state(first.worker_id, s0, {"w": dense(torch.ones(3))})
    for wrong in (TOKEN, s1, "", "guess"):  # the run's secret, another member's session, none, a guess
        message = _refused(lambda wrong=wrong: state.heartbeat(first.worker_id, wrong, 1, None, None))
        assert message.startswith("bad token") and TOKEN not in message and s1 not in message
    state.heartbeat(first.worker_id, s0, 1, None, None)
    state.heartbeat(second.worker_id, s1, 1, None, None)
    # An id that is no member is refused as a bad token: a stranger learns nothing about who is in the run.
    assert "'ghost'" in _refused(lambda: state.heartbeat("ghost", s0, 1, None, None))


def test_a_re_join_issues_a_new_session_and_the_old_one_stops_working() -> None:
    state = _state()
    member, old = state.join_session("h", TOKEN, PROTOCOL_VERSION, "w0")
    again, new = state.join_session("elsewhere", TOKEN, PROTOCOL_VERSION, "w0")
    assert again is member and member.joins == 2 and new != old
    _refused(lambda: state.check_member("w0", old))
    state.check_member("w0", new)


def test_the_membership_a_checkpoint_keeps_holds_the_digest_and_resume_honours_it() -> None:
    state = _state()
    members, sessions = zip(*(state.join_session("h", TOKEN, PROTOCOL_VERSION) for _ in range(2)), strict=True)
    state.offer_initial_state(members[0].worker_id, sessions[0], {"w": dense(torch.ones(3))})
    kept = state.membership()
    assert {w: f["session_digest"] for w, f in kept.items()} == {m.worker_id: digest(s) for m, s in
                                                                 zip(members, sessions, strict=True)}
    assert not any(s in repr(kept) for s in sessions)
    assert state.aggregator is not None
    resumed = _state()
    resumed.restore(state.aggregator.replica, state.aggregator.state, state.aggregator.downlink_state,
                    members=kept)
    resumed.heartbeat(members[1].worker_id, sessions[1], 3, None, None)  # no re-join needed
    _refused(lambda: resumed.heartbeat(members[0].worker_id, sessions[1], 3, None, None))


def test_without_a_token_nothing_is_authenticated() -> None:
    state = _state(token="")
    member, session = state.join_session("h", "anything", PROTOCOL_VERSION)
    assert session  # issued all the same: a client never needs to know whether the run checks it
    state.heartbeat(member.worker_id, "", 1, None, None)


def test_a_worker_token_joins_only_as_its_own_name() -> None:
    state = _state(worker_tokens=WORKER_TOKENS)
    member, session = state.join_session("h", WORKER_TOKENS["w1"], PROTOCOL_VERSION, "w1")
    assert member.worker_id == "w1"
    state.check_member("w1", session)
    # Another worker's token, the run's token (it admits no join once worker tokens are given), a guess:
    for token, name in ((WORKER_TOKENS["w1"], "w0"), (TOKEN, "w0"), ("guess", "w0"), (WORKER_TOKENS["w0"], "w9")):
        message = _refused(lambda token=token, name=name: state.join_session("h", token, PROTOCOL_VERSION, name))
        assert message.startswith("bad token") and not any(t in message for t in (*WORKER_TOKENS.values(), TOKEN))
    assert sorted(state.members) == ["w1"]
    anonymous, _ = state.join_session("h", WORKER_TOKENS["w0"], PROTOCOL_VERSION)  # no name asked: its token's
    assert anonymous.worker_id == "w0"


def test_the_operator_presents_the_runs_token_or_with_worker_tokens_only_any_of_them() -> None:
    Gate(TOKEN, WORKER_TOKENS).check_operator(TOKEN)
    _refused(lambda: Gate(TOKEN, WORKER_TOKENS).check_operator(WORKER_TOKENS["w0"]))
    Gate("", WORKER_TOKENS).check_operator(WORKER_TOKENS["w1"])
    _refused(lambda: Gate("", WORKER_TOKENS).check_operator("guess"))
    Gate("").check_operator("")
