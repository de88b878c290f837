"""The coordinator's round/membership state machine, driven with a fake clock (no sockets, no threads)."""

from __future__ import annotations

import pytest
import torch

from compression.payload import dense
from coordinator.errors import Code, Rejected
from coordinator.state import KEPT_AGGREGATES, AlreadyFolded, CoordinatorState, Phase
from protocols.base import Update
from protocols.config import PROTOCOL_VERSION
from protocols.downlink import apply_aggregate
from protocols.registry import build_protocol
from tests.conftest import tiny_config

STATE = {"w": torch.ones(3, 2)}


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make(workers: int = 3, min_workers: int = 2, deadline: float = 10.0, timeout: float = 5.0, steps: int = 10
         ) -> tuple[CoordinatorState, Clock]:
    cluster = {"workers": workers, "min_workers": min_workers, "round_deadline_s": deadline,
               "heartbeat_timeout_s": timeout}
    cfg = tiny_config(cluster=cluster, train__steps=steps)
    clock = Clock()
    return CoordinatorState(cfg, build_protocol(cfg), clock=clock), clock


def join_all(state: CoordinatorState, n: int) -> list[str]:
    return [state.join("host", "", PROTOCOL_VERSION).worker_id for _ in range(n)]


def update(value: float) -> Update:
    return Update({"w": dense(torch.full((3, 2), value))})


def started(workers: int = 1, steps: int = 10) -> tuple[CoordinatorState, list[str]]:
    state, _ = make(workers=workers, min_workers=workers, timeout=1000.0, steps=steps)
    ids = join_all(state, workers)
    state.offer_initial_state(ids[0], "", {"w": dense(STATE["w"])})
    return state, ids


@pytest.mark.parametrize("owned", [False, True])
def test_an_offered_state_is_copied_unless_it_is_the_coordinators_to_keep(owned: bool) -> None:
    state, _ = make(workers=1, min_workers=1)
    ids = join_all(state, 1)
    offered = torch.ones(3, 2)
    state.offer_initial_state(ids[0], "", {"w": dense(offered)}, owned=owned)
    assert state.aggregator is not None
    kept = state.aggregator.replica.params["w"]
    assert torch.equal(kept, offered)
    # In-process, the offer is the worker's live tensor: training must not move the coordinator's replica. Off
    # the wire (owned), the assembled tensor becomes the replica without a second copy of the model.
    assert (kept.data_ptr() == offered.data_ptr()) is owned
    offered.add_(1.0)
    assert torch.equal(kept, torch.ones(3, 2)) is not owned


def test_only_the_first_joiner_is_asked_to_offer_the_initial_state() -> None:
    state, _ = make()
    ids = join_all(state, 3)
    assert [state.must_offer_state(w) for w in ids] == [True, False, False]
    assert state.aggregator is None and state.state_hash == ""
    state.offer_initial_state(ids[0], "", {"w": dense(STATE["w"])})
    assert not any(state.must_offer_state(w) for w in ids)
    assert state.phase is Phase.TRAINING and state.round == 0
    assert state.aggregator is not None and state.state_hash == state.aggregator.replica.digest()
    with pytest.raises(Rejected) as info:  # a second offer changes nothing
        state.offer_initial_state(ids[1], "", {"w": dense(torch.zeros(3, 2))})
    assert info.value.code is Code.ALREADY_EXISTS
    assert torch.equal(state.aggregator.replica.params["w"], STATE["w"])


def test_a_dead_initializer_is_replaced_by_the_next_joiner() -> None:
    state, clock = make(timeout=5.0)
    first = state.join("host", "", PROTOCOL_VERSION).worker_id
    clock.now = 6.0
    state.tick()  # the initializer went silent before offering anything
    second = state.join("host", "", PROTOCOL_VERSION).worker_id
    assert state.must_offer_state(second) and not state.must_offer_state(first)


def test_round_closes_at_the_deadline_with_a_quorum_but_not_without() -> None:
    state, clock = make(workers=3, min_workers=2, deadline=10.0, timeout=100.0)
    ids = join_all(state, 3)
    state.offer_initial_state(ids[0], "", {"w": dense(STATE["w"])})
    state.submit(ids[0], "", 0, update(0.1), {}, 10)
    clock.now = 11.0
    state.tick()
    assert state.round == 0  # one report is below the quorum of two: keep waiting
    state.count_download(ids[2], 30)
    state.submit(ids[1], "", 0, update(0.3), {}, 20)  # past the deadline, the quorum report closes it
    assert state.round == 1 and state.history[-1].closed_by == "deadline"
    record = state.history[-1]
    assert record.workers == sorted(ids[:2])
    # Bytes per worker average over every member: (10 + 20) / 3 sent, 30 / 3 received.
    assert (record.bytes_sent_per_worker, record.bytes_received_per_worker) == (10.0, 10.0)
    assert record.bytes_total_per_worker == 20.0 and record.resyncs == 0
    assert record.downlink_bytes == state.aggregates[0][0].nbytes() > 0
    with pytest.raises(Rejected) as info:  # the straggler's late update is stale now
        state.submit(ids[2], "", 0, update(9.0), {}, 10)
    assert info.value.code is Code.FAILED_PRECONDITION and info.value.message.startswith("stale round")
    assert state.members[ids[2]].bytes_sent == 0


def test_a_silent_worker_is_dropped_and_the_round_closes_without_it() -> None:
    state, clock = make(workers=2, min_workers=1, deadline=1000.0, timeout=5.0)
    ids = join_all(state, 2)
    state.offer_initial_state(ids[0], "", {"w": dense(STATE["w"])})
    state.submit(ids[0], "", 0, update(0.5), {}, 10)
    assert state.round == 0
    clock.now = 6.0
    state.heartbeat(ids[0], "", 5, 1.0, None)  # the reporter is alive, the other is silent
    state.tick()
    assert state.round == 1 and state.history[-1].closed_by == "all"
    assert not state.members[ids[1]].alive and state.members[ids[0]].alive


def test_rejected_updates_leave_no_trace() -> None:
    state, ids = started(workers=2)
    before = state.state_hash
    for bad in (Update({"w": dense(torch.full((3, 2), float("nan")))}), Update({"w": dense(torch.zeros(2, 3))}),
                Update({"w": dense(torch.zeros(3, 2))}, weight=0.0)):
        with pytest.raises(Rejected) as info:
            state.submit(ids[0], "", 0, bad, {}, 10)
        assert info.value.code is Code.INVALID_ARGUMENT
    assert state.aggregator is not None and state.aggregator.acc.count == 0 and state.aggregator.senders == []
    assert state.members[ids[0]].bytes_sent == 0 and state.state_hash == before
    state.submit(ids[0], "", 0, update(0.5), {}, 10)
    state.submit(ids[0], "", 0, update(9.0), {}, 10)  # a second push for the round: acknowledged, not folded
    assert state.aggregator.acc.count == 1 and state.members[ids[0]].bytes_sent == 10


def test_the_last_aggregates_are_kept_and_an_older_round_is_refused_naming_those_kept() -> None:
    rounds = KEPT_AGGREGATES + 2
    state, (wid,) = started(workers=1, steps=5 * rounds)
    assert state.total_rounds == rounds
    replicas, hashes = [], []
    for r in range(rounds):
        assert state.aggregator is not None
        # A copy: the coordinator steps its replica in place at each close, unless lent (`RoundAggregator.lend`).
        replicas.append(state.aggregator.replica.copy())
        state.submit(wid, "", r, update(0.1 * (r + 1)), {}, 10)
        hashes.append(state.state_hash)
    assert state.phase is Phase.FINISHED and len(set(hashes)) == rounds
    kept = list(range(rounds - KEPT_AGGREGATES, rounds))
    assert KEPT_AGGREGATES == 4 and sorted(state.aggregates) == kept

    for r in range(rounds - KEPT_AGGREGATES):
        with pytest.raises(Rejected) as info:
            state.aggregate_for(wid, "", r)
        assert info.value.code is Code.FAILED_PRECONDITION
        assert f"the aggregate of round {r} is not available" in info.value.message
        assert f"keeps rounds {kept}" in info.value.message
    # A replica as far behind as the oldest kept round catches up with aggregates alone, to the same digest.
    replica = replicas[kept[0]]
    for r in kept:
        aggregate, digest, own = state.aggregate_for(wid, "", r)
        assert aggregate.round == r and digest == hashes[r] and own is None  # a dense downlink relays nothing
        replica = apply_aggregate(state.protocol, state.downlink, aggregate, replica)
        assert replica.round == r + 1 and replica.digest() == digest
    assert replica.digest() == state.state_hash
    with pytest.raises(Rejected) as info:  # the round not yet closed is not available either
        state.aggregate_for(wid, "", rounds)
    assert info.value.code is Code.FAILED_PRECONDITION
    with pytest.raises(Rejected) as info:
        state.aggregate_for("ghost", "", kept[-1])
    assert info.value.code is Code.NOT_FOUND


def test_snapshot_counts_pulls_and_a_resync_for_a_replica_that_fell_behind_or_differed() -> None:
    state, _ = make(workers=2, min_workers=2)
    ids = join_all(state, 2)
    with pytest.raises(Rejected) as info:  # no state yet: refused, and not counted as a pull
        state.snapshot(ids[1], "")
    assert info.value.code is Code.FAILED_PRECONDITION
    assert state.members[ids[1]].pulls == 0
    state.offer_initial_state(ids[0], "", {"w": dense(STATE["w"])})

    snap = state.snapshot(ids[1], "")  # joining: a pull, not a resync
    assert (snap.round, snap.phase) == (0, Phase.TRAINING)
    assert snap.state_hash == snap.replica.digest() == state.state_hash
    assert (state.members[ids[1]].pulls, state.members[ids[1]].resyncs) == (1, 0)
    state.snapshot(ids[1], "", resync=True)
    state.snapshot(ids[1], "", resync=True)
    assert (state.members[ids[1]].pulls, state.members[ids[1]].resyncs) == (3, 2)
    assert (state.members[ids[0]].pulls, state.members[ids[0]].resyncs) == (0, 0)
    with pytest.raises(Rejected):  # a stranger's resync is refused and counted nowhere
        state.snapshot("ghost", "", resync=True)
    for wid in ids:
        state.submit(wid, "", 0, update(0.2), {}, 10)
    assert state.history[-1].resyncs == 2


@pytest.mark.parametrize(("key", "value"), [("train_loss", float("nan")), ("wall_s", float("inf")),
                                            ("blocked_s", -0.5)])
def test_a_non_finite_or_negative_metric_refuses_the_whole_update(key: str, value: float) -> None:
    state, (w0, w1) = started(workers=2)
    with pytest.raises(Rejected) as refused:
        state.submit(w0, "", 0, update(0.1), {key: value}, 10)
    assert refused.value.code is Code.INVALID_ARGUMENT and repr(key) in refused.value.message
    # Nothing was folded or counted: the same worker's good update for the round is still taken.
    assert state.members[w0].bytes_sent == 0
    state.submit(w0, "", 0, update(0.1), {"wall_s": 2.0, "compute_s": 1.0, "utilization": 0.5}, 10)
    state.submit(w1, "", 0, update(0.3), {"wall_s": 1.0, "compute_s": 1.0, "utilization": 1.0}, 10)
    record = state.history[-1]
    assert (record.wall_s, record.compute_s, record.compute_utilization) == (1.5, 1.0, 0.75)
    assert record.utilization_per_worker == {w0: 0.5, w1: 1.0}


def test_the_first_attested_base_is_the_runs_and_a_different_one_is_refused() -> None:
    state, _ = make()
    w0, w1, w2 = join_all(state, 3)
    base, other = "a" * 64, "b" * 64
    assert state.attest_base(w0, "", base) == base
    assert state.attest_base(w1, "", base) == base
    with pytest.raises(Rejected) as err:
        state.attest_base(w2, "", other)
    assert err.value.code is Code.FAILED_PRECONDITION and "frozen base weights" in str(err.value)
    assert state.base_digest == base  # the refusal changed nothing
    with pytest.raises(Rejected) as err:
        state.attest_base(w2, "", "not-a-digest")
    assert err.value.code is Code.INVALID_ARGUMENT
    with pytest.raises(Rejected) as err:
        state.attest_base("nobody", "", base)
    assert err.value.code is Code.NOT_FOUND


def test_a_resumed_run_keeps_its_base_digest() -> None:
    live, _ = started()
    assert live.aggregator is not None
    state, _ = make()
    state.restore(live.aggregator.replica, live.aggregator.state, live.aggregator.downlink_state, "c" * 64)
    (w0,) = join_all(state, 1)
    with pytest.raises(Rejected):
        state.attest_base(w0, "", "d" * 64)


def test_a_retried_push_is_acknowledged_and_folded_once() -> None:
    state, ids = started(workers=2)
    state.submit(ids[0], "", 0, update(1.0), {}, 10)
    state.submit(ids[0], "", 0, update(1.0), {}, 10)  # the reply was lost; the worker pushes again
    assert state.aggregator is not None and state.aggregator.acc.count == 1
    state.submit(ids[1], "", 0, update(3.0), {}, 10)
    assert state.round == 1
    state.submit(ids[1], "", 0, update(3.0), {}, 10)  # retried after its round closed: still acknowledged
    with pytest.raises(AlreadyFolded):
        state.check_push(ids[1], "", 0, initial_state=False)
    assert state.round == 1 and state.members[ids[1]].bytes_sent == 10


def test_a_round_never_closes_on_fewer_than_the_quorum_even_when_the_others_went_quiet() -> None:
    state, clock = make(workers=3, min_workers=2, deadline=10.0, timeout=5.0)
    ids = join_all(state, 3)
    state.offer_initial_state(ids[0], "", {"w": dense(STATE["w"])})
    clock.now = 6.0
    state.heartbeat(ids[0], "", 1, None, None)
    state.tick()  # w1 and w2 lapsed: w0 is the only live worker
    state.submit(ids[0], "", 0, update(1.0), {}, 10)
    clock.now = 20.0
    state.heartbeat(ids[0], "", 1, None, None)
    state.tick()
    assert state.round == 0  # one update, quorum 2: the round waits for a worker to come back
    state.heartbeat(ids[1], "", 1, None, None)
    state.submit(ids[1], "", 0, update(2.0), {}, 10)
    assert state.round == 1


def test_hostile_numbers_are_refused_and_change_nothing() -> None:
    state, ids = started(workers=2)
    for loss, eval_loss in ((float("inf"), None), (-12345.0, None), (None, float("-inf"))):
        with pytest.raises(Rejected) as err:
            state.heartbeat(ids[0], "", 1, loss, eval_loss)
        assert err.value.code is Code.INVALID_ARGUMENT
    assert state.members[ids[0]].loss is None and state.members[ids[0]].eval_loss is None
    for wait in (float("nan"), float("inf"), -1.0):
        with pytest.raises(Rejected):
            state.wait_for_round(0, wait)


def test_an_anonymous_join_never_takes_a_named_workers_id() -> None:
    state, _ = make(workers=4)
    named = state.join("host", "", PROTOCOL_VERSION, requested_id="w1")
    anonymous = [state.join("host", "", PROTOCOL_VERSION).worker_id for _ in range(2)]
    assert named.worker_id == "w1" and "w1" not in anonymous and len(set(anonymous)) == 2
    assert state.members["w1"] is named


def test_a_worker_that_left_stays_departed_until_it_joins_again() -> None:
    state, _ = make(workers=2, min_workers=1, timeout=1000.0)
    ids = join_all(state, 2)
    state.offer_initial_state(ids[0], "", {"w": dense(STATE["w"])})
    state.leave(ids[1], "")
    with pytest.raises(Rejected) as err:
        state.submit(ids[1], "", 0, update(1.0), {}, 10)  # a refused push must not revive it
    assert err.value.code is Code.NOT_FOUND and "left the run" in str(err.value)
    assert not state.members[ids[1]].alive
    state.submit(ids[0], "", 0, update(1.0), {}, 10)
    assert state.round == 1  # the round did not wait for the departed worker
    state.join("host", "", PROTOCOL_VERSION, requested_id=ids[1])
    state.heartbeat(ids[1], "", 0, None, None)
    assert state.members[ids[1]].alive


def test_a_weight_that_would_overflow_the_sum_is_refused() -> None:
    state, ids = started(workers=2)
    with pytest.raises(Rejected) as err:
        state.submit(ids[0], "", 0, Update({"w": dense(torch.ones(3, 2))}, weight=1e39), {}, 10)
    assert err.value.code is Code.INVALID_ARGUMENT and "weight" in str(err.value)
    assert state.aggregator is not None and state.aggregator.acc.count == 0


def test_a_snapshot_is_lent_so_a_close_leaves_it_as_it_was_and_steps_in_place_once_it_is_back() -> None:
    state, (wid,) = started(workers=1, steps=30)
    assert state.aggregator is not None
    snap = state.snapshot(wid, "")
    digest = snap.replica.digest()
    assert digest == state.state_hash
    state.submit(wid, "", 0, update(0.1), {}, 10)  # closes round 0 while the snapshot is still being read
    assert snap.replica.digest() == digest and state.state_hash != digest
    snap.release()
    replica = state.aggregator.replica
    pointer = replica.params["w"].data_ptr()
    state.submit(wid, "", 1, update(0.2), {}, 10)  # nobody holds round 1's replica: stepped in its own tensor
    assert state.aggregator.replica.params["w"].data_ptr() == pointer and replica.digest() != digest
    assert state.aggregator.replica.digest() == state.state_hash
