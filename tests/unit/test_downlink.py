"""The downlink (`protocols/downlink.py`): what goes back to every replica after a round, and how a
replica applies it. Whatever the mode, the aggregator's replica after `close` is exactly the replica a
worker computes from the `Aggregate` alone; dense and sparse downlinks apply exactly `close`'s update."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest
import torch

from compression import registry
from compression.error_feedback import ErrorFeedback
from protocols.base import Aggregate, Update
from protocols.compressed import Compression
from protocols.diloco import DiLoCo
from protocols.downlink import DecodedOnRead, Downlink, apply_aggregate, union_payload
from protocols.replica import Params, Replica
from protocols.round import RoundAggregator, UpdateRejected, union_bound
from protocols.settings import DownlinkConfig
from protocols.sparseloco import SparseLoCo
from tests.unit.protocol_helpers import assert_replicas_equal, checked, locals_from, rand

START: Params = {"w": rand(0, (16, 24)), "b": rand(1, (24,))}


def _deltas(seed: int, params: Params, scale: float = 0.01) -> Params:
    return {n: rand(seed * 10 + i, tuple(t.shape), scale) for i, (n, t) in enumerate(params.items())}


def _exact_close(aggregator: RoundAggregator, updates: dict[str, Update]) -> Params:
    """What `close` computes for these updates, from a fresh accumulator (the aggregator's round stays open)."""
    protocol = aggregator.protocol
    acc = protocol.new_round()
    for worker, update in updates.items():
        acc.fold(worker, checked(protocol, aggregator.replica, worker, update, acc))
    update_params, _ = protocol.close(acc, aggregator.state)
    return update_params


def _dense_updates(protocol: DiLoCo, params: Params, round_: int, workers: int = 3) -> dict[str, Update]:
    updates = {}
    for k in range(workers):
        update, _ = protocol.make_update(locals_from(params, _deltas(100 * round_ + k, params)), params, None)
        updates[f"w{k}"] = update
    return updates


def test_dense_downlink_applies_exactly_the_aggregate() -> None:
    protocol = DiLoCo()  # momentum and Nesterov: the replica carries outer state from round to round
    downlink = Downlink.from_config(DownlinkConfig(), protocol)  # "auto" is dense for DiLoCo
    assert downlink.mode == "dense" and downlink.init_state() is None
    aggregator = RoundAggregator(protocol, downlink, Replica(0, START))
    worker = aggregator.replica
    for r in range(3):
        before = aggregator.replica
        updates = _dense_updates(protocol, before.params, r)
        exact = _exact_close(aggregator, updates)
        for w, update in updates.items():
            aggregator.submit(w, update)
        aggregate = aggregator.close()
        assert aggregate.round == r and not aggregate.relayed
        for name, payload in aggregate.payloads.items():
            assert payload.codec == "dense" and torch.equal(registry.decode(payload), exact[name])
        assert_replicas_equal(aggregator.replica, protocol.apply(exact, before))
        worker = apply_aggregate(protocol, Downlink("dense"), aggregate, worker)
        assert_replicas_equal(worker, aggregator.replica)


@pytest.mark.parametrize("feedback", ["ef14", "ef21"])
def test_int8_downlink_replica_is_what_workers_compute_from_the_aggregate_alone(feedback: str) -> None:
    protocol = DiLoCo()
    cfg = DownlinkConfig(codec="int8", error_feedback=feedback)
    downlink = Downlink.from_config(cfg, protocol)
    assert downlink.mode == "codec" and downlink.keeps_shift == (feedback == "ef21")
    aggregator = RoundAggregator(protocol, downlink, Replica(0, START))
    workers = [aggregator.replica, aggregator.replica]  # two replicas, each with its own Downlink
    for r in range(4):
        before = aggregator.replica
        old_state = aggregator.downlink_state
        assert isinstance(old_state, ErrorFeedback)
        old_residual = {n: old_state.residual(n) for n in START}
        updates = _dense_updates(protocol, before.params, r)
        exact = _exact_close(aggregator, updates)
        for w, update in updates.items():
            aggregator.submit(w, update)
        aggregate = aggregator.close()
        assert {p.codec for p in aggregate.payloads.values()} == {"int8"}
        workers = [apply_aggregate(protocol, Downlink.from_config(cfg, protocol), aggregate, w) for w in workers]
        for replica in workers:
            assert_replicas_equal(replica, aggregator.replica)
        # The aggregator applies the decoded message, never the exact update (int8 is lossy).
        assert not torch.equal(aggregator.replica.params["w"], protocol.apply(exact, before).params["w"])
        new_state = aggregator.downlink_state
        assert isinstance(new_state, ErrorFeedback) and new_state is not old_state
        for name in START:
            decoded = registry.decode(aggregate.payloads[name])
            if feedback == "ef14":
                # DoubleSqueeze's bookkeeping: sent + new residual == update + carried residual.
                old = old_residual[name] if old_residual[name] is not None else torch.zeros_like(exact[name])
                new = new_state.residual(name)
                assert new is not None
                torch.testing.assert_close(decoded + new, exact[name] + old, rtol=1e-6, atol=1e-7)
                assert aggregator.replica.downlink_shift == {}
            else:
                # EF21-P: every replica keeps the same receiver shift as the aggregator's encoder.
                shift = new_state.shift(name)
                assert shift is not None
                torch.testing.assert_close(aggregator.replica.downlink_shift[name], shift)


def _sparse_round(senders: int, overlap: bool) -> tuple[RoundAggregator, dict[str, Update], Params]:
    """A SparseLoCo round (paper codec: top-64 of 4096 per chunk, 2 bits) with `senders` workers, open;
    with `overlap` every worker's largest entries sit on the same coordinates."""
    protocol = SparseLoCo()
    params = {"w": rand(0, (2, 4096)), "b": rand(1, (300,))}
    aggregator = RoundAggregator(protocol, Downlink.from_config(DownlinkConfig(), protocol), Replica(0, params))
    assert aggregator.downlink.mode == "sparse"
    # Exactly k coordinates per chunk (one every 64 of 4096; 5 of b's 300): each worker's top-k is these.
    common = {n: torch.zeros(t.numel()) for n, t in params.items()}
    common["w"][::64], common["b"][::60] = 1.0, 1.0
    updates = {}
    for k in range(senders):
        deltas = _deltas(k + 1, params)
        if overlap:
            deltas = {n: d + common[n].view(d.shape) for n, d in deltas.items()}
        update, _ = protocol.make_update(locals_from(params, deltas), params, protocol.init_worker_state(params))
        updates[f"w{k}"] = update
    exact = _exact_close(aggregator, updates)
    for w, update in updates.items():
        aggregator.submit(w, update)
    return aggregator, updates, exact


@pytest.mark.parametrize(("senders", "overlap", "relayed"), [(2, False, True), (12, True, False)])
def test_sparse_downlink_sends_the_smaller_form_and_replicas_apply_the_exact_update(
    senders: int, overlap: bool, relayed: bool
) -> None:
    aggregator, updates, exact = _sparse_round(senders, overlap)
    before = aggregator.replica
    relay_bytes = sum(u.nbytes() for u in updates.values())
    union_bytes = sum(union_payload(t).nbytes() for t in exact.values())
    assert (relay_bytes < union_bytes) == relayed  # the round was built to need this form
    aggregate = aggregator.close()
    if relayed:
        assert not aggregate.payloads and len(aggregate.relayed) == senders
        assert list(aggregate.relayed) == list(updates.values())  # in the order they were folded
    else:
        assert not aggregate.relayed and {p.codec for p in aggregate.payloads.values()} == {"topk_global"}
    assert aggregate.nbytes() == min(relay_bytes, union_bytes)
    worker = apply_aggregate(SparseLoCo(), Downlink("sparse"), aggregate, before)
    applied_exactly = SparseLoCo().apply(exact, before)
    assert_replicas_equal(worker, applied_exactly)
    assert_replicas_equal(aggregator.replica, applied_exactly)


@pytest.mark.parametrize("in_order", [False, True])
def test_a_round_keeps_encoded_updates_only_while_relaying_can_win_and_then_closes_on_the_union(
    in_order: bool,
) -> None:
    """Relay candidates are kept encoded and below the union's largest size; once they pass it they are
    dropped, and the aggregate is exactly what keeping them all would have given (the union)."""
    protocol = SparseLoCo()
    params = {"w": rand(0, (1, 4096))}
    aggregator = RoundAggregator(protocol, Downlink.from_config(DownlinkConfig(), protocol), Replica(0, params),
                                 fold_in_order=in_order)
    distinct = [protocol.make_update(locals_from(params, _deltas(k + 1, params)), params,
                                     protocol.init_worker_state(params))[0] for k in range(3)]
    bound = union_bound(aggregator.expect)
    assert aggregator.relay_bound == bound == 4096 * 4  # the dense float32 tensor: a union is never larger
    senders = bound // distinct[0].nbytes() + 2  # enough that relaying them all cannot beat the union
    updates = {f"w{k:03d}": distinct[k % 3] for k in range(senders)}
    exact = _exact_close(aggregator, updates)
    kept = []
    for w, update in updates.items():
        aggregator.submit(w, update)
        kept.append(aggregator.relay_bytes)
        assert aggregator.relay_bytes < bound  # never more than the bound
    assert kept[0] == distinct[0].nbytes() and kept[-1] == 0 and aggregator.relayed is None  # dropped
    everything = tuple(updates.values())  # what the round would relay had it kept them all
    unbounded, _ = aggregator.downlink.encode(0, exact, everything, None)
    assert not unbounded.relayed  # the union was the smaller form: nothing was lost by dropping the relay
    before = aggregator.replica
    aggregate = aggregator.close()
    assert not aggregate.relayed and aggregate.payloads.keys() == unbounded.payloads.keys()
    for name, payload in aggregate.payloads.items():
        for component, tensor in payload.tensors.items():
            assert torch.equal(tensor, unbounded.payloads[name].tensors[component])
    assert_replicas_equal(aggregator.replica, apply_aggregate(protocol, Downlink("sparse"), unbounded, before))
    assert aggregator.relayed == [] and aggregator.relay_bytes == 0  # the next round may relay again


def test_a_union_goes_dense_once_an_index_per_entry_would_not_be_smaller() -> None:
    """At float32 a `topk_global` union costs 8 bytes per nonzero entry, the dense tensor 4 per entry: past half
    the entries nonzero the dense form is sent (never more bytes than the dense update), and it decodes to the
    same values as the index form would."""
    update = torch.zeros(10, 10)
    update.view(-1)[:49] = torch.linspace(-1, 1, 49)  # 49 of 100 nonzero: 392 bytes indexed, 400 dense
    sparse = union_payload(update)
    assert sparse.codec == "topk_global" and sparse.nbytes() == 49 * 8
    update.view(-1)[49] = 0.5  # 50 of 100: 400 bytes either way, and the dense form needs no index
    dense_form = union_payload(update)
    assert dense_form.codec == "dense" and dense_form.nbytes() == 100 * 4
    assert torch.equal(registry.decode(dense_form), update)
    update.view(-1)[49] = 0.0
    assert torch.equal(registry.decode(sparse), update)


def test_many_senders_distinct_coordinates_close_dense_and_apply_exactly() -> None:
    """Enough senders with distinct top-k masks cover most coordinates: the round's union is the dense tensor,
    within `union_bound`, and every replica still applies the aggregator's exact update."""
    aggregator, _, exact = _sparse_round(200, overlap=False)
    before = aggregator.replica
    aggregate = aggregator.close()
    assert not aggregate.relayed and {p.codec for p in aggregate.payloads.values()} == {"dense"}
    assert aggregate.nbytes() <= union_bound(aggregator.expect)
    applied_exactly = SparseLoCo().apply(exact, before)
    assert_replicas_equal(apply_aggregate(SparseLoCo(), Downlink("sparse"), aggregate, before), applied_exactly)
    assert_replicas_equal(aggregator.replica, applied_exactly)


def _corrupt_packed_indices(update: Update) -> Update:
    payload = update.payloads["w"]
    tensors = {**payload.tensors, "indices": payload.tensors["indices"][:-1]}
    return Update({**update.payloads, "w": dataclasses.replace(payload, tensors=tensors)}, update.weight)


def _nan_bin_mean(update: Update) -> Update:
    payload = update.payloads["w"]
    means = payload.tensors["means"].clone()
    means[0] = float("nan")
    tensors = {**payload.tensors, "means": means}
    return Update({**update.payloads, "w": dataclasses.replace(payload, tensors=tensors)}, update.weight)


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [(_corrupt_packed_indices, "packed length mismatch"), (_nan_bin_mean, "contains NaN or Inf")],
)
def test_corrupted_relayed_updates_are_refused_at_the_replica(
    corrupt: Callable[[Update], Update], message: str
) -> None:
    aggregator, _, _ = _sparse_round(2, overlap=False)
    before = aggregator.replica
    aggregate = aggregator.close()
    assert aggregate.relayed
    bad = Aggregate(aggregate.round, relayed=(aggregate.relayed[0], corrupt(aggregate.relayed[1])))
    with pytest.raises(UpdateRejected, match=rf"worker relayed1: tensor 'w'.*{message}"):
        apply_aggregate(SparseLoCo(), Downlink("sparse"), bad, before)
    # The untouched aggregate still applies: only the corruption was refused.
    assert_replicas_equal(apply_aggregate(SparseLoCo(), Downlink("sparse"), aggregate, before), aggregator.replica)


def test_relayed_updates_are_refused_by_a_downlink_that_never_relays() -> None:
    aggregator, _, _ = _sparse_round(2, overlap=False)
    before = aggregator.replica
    aggregate = aggregator.close()
    with pytest.raises(ValueError, match="a dense downlink received relayed updates"):
        apply_aggregate(SparseLoCo(), Downlink("dense"), aggregate, before)


def test_an_aggregate_for_another_round_is_refused() -> None:
    protocol = DiLoCo()
    aggregator = RoundAggregator(protocol, Downlink("dense"), Replica(0, START))
    for w, update in _dense_updates(protocol, START, 0).items():
        aggregator.submit(w, update)
    aggregate = aggregator.close()
    ahead = aggregator.replica  # at round 1: round 0's aggregate is already in it
    with pytest.raises(ValueError, match="aggregate of round 0 cannot apply to a replica at round 1"):
        apply_aggregate(protocol, Downlink("dense"), aggregate, ahead)
    with pytest.raises(ValueError, match="aggregate of round 5 cannot apply to a replica at round 0"):
        apply_aggregate(protocol, Downlink("dense"), dataclasses.replace(aggregate, round=5), Replica(0, START))


def test_codec_downlink_state_is_not_modified_by_encode() -> None:
    # The coordinator may encode a round and then abandon it; the previous encoder state must survive.
    downlink = Downlink("codec", Compression(codec="int8", error_feedback="ef14"))
    state = downlink.init_state()
    _, state = downlink.encode(0, {"w": rand(3, (64,))}, (), state)
    assert isinstance(state, ErrorFeedback)
    kept = {n: t.clone() for n, t in state.state_dict()["error"].items()}
    _, newer = downlink.encode(1, {"w": rand(4, (64,))}, (), state)
    assert newer is not state
    for name, residual in kept.items():
        assert torch.equal(state.state_dict()["error"][name], residual)


def test_the_update_is_decoded_tensor_by_tensor_as_it_is_read_and_applies_as_the_decoded_dict_does() -> None:
    protocol = SparseLoCo()
    aggregator = RoundAggregator(protocol, Downlink.from_config(DownlinkConfig(), protocol), Replica(0, START))
    update = {n: t * (torch.rand(t.shape, generator=torch.Generator().manual_seed(7)) < 0.2) for n, t in START.items()}
    aggregate = Aggregate(0, {n: union_payload(t) for n, t in update.items()})
    lazy, _ = aggregator.downlink.decode(protocol, aggregate, aggregator.replica)
    assert isinstance(lazy, DecodedOnRead) and list(lazy) == list(update)
    first, again = lazy["w"], lazy["w"]
    assert first is not again and torch.equal(first, again) and torch.equal(first, update["w"])  # not kept: read anew
    eager = {n: registry.decode(p) for n, p in aggregate.payloads.items()}
    assert_replicas_equal(apply_aggregate(protocol, aggregator.downlink, aggregate, aggregator.replica),
                          protocol.apply(eager, aggregator.replica))
    bad = {**update, "b": torch.full_like(update["b"], float("inf"))}
    with pytest.raises(ValueError, match="update for 'b' contains NaN or Inf"):
        apply_aggregate(protocol, aggregator.downlink, Aggregate(0, {n: union_payload(t) for n, t in bad.items()}),
                        aggregator.replica)
