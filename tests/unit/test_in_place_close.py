"""A close that steps the aggregator's replica in its own tensors (`RoundAggregator(in_place=True)`, the
coordinator's) gives the very replica the pure step builds anew, bit for bit, round after round; it reuses the
tensors only while nobody borrowed the replica (`lend`); and a refused aggregate still changes nothing."""

from __future__ import annotations

import pytest
import torch

from compression.payload import dense
from protocols.base import Aggregate
from protocols.diloco import DiLoCo
from protocols.downlink import Downlink, apply_aggregate
from protocols.outer import nesterov_sgd
from protocols.replica import Params, Replica
from protocols.round import RoundAggregator
from protocols.settings import DownlinkConfig, OverlapConfig
from protocols.sparseloco import SparseLoCo
from tests.unit.protocol_helpers import assert_replicas_equal, clone, locals_from, rand


def _params() -> Params:
    return {"w": rand(0, (8, 512)), "b": rand(1, (300,)), "h": rand(2, (64,), dtype=torch.bfloat16)}


def _pointers(replica: Replica) -> dict[str, int]:
    return {name: t.data_ptr() for name, t in replica.params.items()}


@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("nesterov", [False, True])
def test_the_in_place_step_is_the_pure_steps_bits_in_the_same_tensors(momentum: float, nesterov: bool) -> None:
    params = _params()
    buffers: Params = {"w": rand(3, (8, 512))}  # `b` and `h` take their first step: new buffers
    grads = {"w": rand(4, (8, 512), 0.1), "b": rand(5, (300,), 0.1), "h": rand(6, (64,), 0.1)}
    pure_params, pure_buffers = nesterov_sgd(params, grads, buffers, lr=0.7, momentum=momentum, nesterov=nesterov)
    for _ in range(2):  # a second step carries the first's buffers
        pure_params, pure_buffers = nesterov_sgd(pure_params, grads, pure_buffers, 0.7, momentum, nesterov)
    own, own_buffers = clone(params), clone(buffers)
    pointers = {name: t.data_ptr() for name, t in own.items()}
    stepped, stepped_buffers = nesterov_sgd(own, grads, own_buffers, 0.7, momentum, nesterov, in_place=True)
    for _ in range(2):
        stepped, stepped_buffers = nesterov_sgd(stepped, grads, stepped_buffers, 0.7, momentum, nesterov,
                                                   in_place=True)
    assert {name: t.data_ptr() for name, t in stepped.items()} == pointers  # no new parameter tensor
    assert stepped["h"].dtype == torch.bfloat16
    for name in params:
        assert torch.equal(stepped[name].view(-1).view(torch.uint8), pure_params[name].view(-1).view(torch.uint8))
    assert stepped_buffers.keys() == pure_buffers.keys()
    for name, buf in pure_buffers.items():
        assert torch.equal(stepped_buffers[name], buf)
    if momentum:
        assert stepped_buffers["w"].data_ptr() == own_buffers["w"].data_ptr()


def test_a_refused_gradient_changes_no_tensor() -> None:
    params, buffers = _params(), {"w": rand(3, (8, 512))}
    before, buffers_before = clone(params), clone(buffers)
    bad_shape = {"w": rand(4, (8, 512)), "b": rand(5, (301,))}
    with pytest.raises(ValueError, match="gradient for 'b' has shape"):
        nesterov_sgd(params, bad_shape, buffers, lr=1.0, momentum=0.9, in_place=True)
    with pytest.raises(ValueError, match="not parameters"):
        nesterov_sgd(params, {"w": rand(4, (8, 512)), "x": rand(5, (3,))}, buffers, lr=1.0, momentum=0.9,
                     in_place=True)
    assert all(torch.equal(params[n], before[n]) for n in params)
    assert torch.equal(buffers["w"], buffers_before["w"])


def _sparseloco_round(aggregator: RoundAggregator, round_: int, senders: int = 3) -> None:
    protocol = aggregator.protocol
    params = aggregator.replica.params
    for k in range(senders):
        deltas = {n: rand(100 * round_ + 10 * k + i, tuple(t.shape), 0.01).to(t.dtype)
                  for i, (n, t) in enumerate(params.items())}
        update, _ = protocol.make_update(locals_from(params, deltas), params, protocol.init_worker_state(params))
        aggregator.submit(f"w{k}", update)


@pytest.mark.parametrize("protocol", [SparseLoCo(), DiLoCo(), SparseLoCo(outer_momentum=0.5, outer_lr=0.7)],
                         ids=["sparseloco", "diloco", "sparseloco-momentum"])
def test_an_in_place_close_makes_the_pure_closes_replicas_round_after_round(protocol: SparseLoCo | DiLoCo) -> None:
    downlink = Downlink.from_config(DownlinkConfig(), protocol)
    pure = RoundAggregator(protocol, downlink, Replica(0, _params()))
    own = RoundAggregator(protocol, downlink, Replica(0, _params()), in_place=True)
    worker = own.replica.copy()
    pointers = _pointers(own.replica)
    for r in range(3):
        _sparseloco_round(pure, r)
        _sparseloco_round(own, r)
        aggregate = own.close()
        assert aggregate.nbytes() == pure.close().nbytes()
        assert _pointers(own.replica) == pointers  # stepped where it was: no second replica
        assert_replicas_equal(own.replica, pure.replica)
        worker = apply_aggregate(protocol, downlink, aggregate, worker)  # what every worker computes
        assert_replicas_equal(worker, own.replica)


def test_a_lent_replica_is_left_as_it_was_and_the_next_close_after_its_release_steps_in_place() -> None:
    protocol = SparseLoCo()
    aggregator = RoundAggregator(protocol, Downlink.from_config(DownlinkConfig(), protocol), Replica(0, _params()),
                                 in_place=True)
    lent, digest = aggregator.replica, aggregator.replica.digest()
    release = aggregator.lend()
    second = aggregator.lend()  # two readers: both must give it back
    _sparseloco_round(aggregator, 0)
    aggregator.close()
    assert lent.digest() == digest and aggregator.replica.round == 1  # a new replica; the lent one untouched
    assert _pointers(aggregator.replica) != _pointers(lent)
    release()
    release()  # again: harmless, the second reader still holds it
    stepped = aggregator.replica
    pointers = _pointers(stepped)
    _sparseloco_round(aggregator, 1)
    aggregator.close()  # the lent replica is no longer the current one: this one was never lent
    assert _pointers(aggregator.replica) == pointers and stepped.round == 1  # stepped in place
    second()
    assert not aggregator._lent  # every loan is back
    assert lent.digest() == digest


def test_a_refused_aggregate_changes_nothing_in_place() -> None:
    protocol = DiLoCo()
    replica = Replica(0, _params(), momentum={"w": rand(3, (8, 512))})
    before = replica.copy()
    nan = {n: torch.zeros_like(t, dtype=torch.float32) for n, t in replica.params.items()}
    nan["h"][5] = float("nan")  # the last tensor: every earlier one would be stepped by then without the check
    with pytest.raises(ValueError, match="'h' contains NaN or Inf"):
        apply_aggregate(protocol, Downlink("dense"), Aggregate(0, {n: dense(t) for n, t in nan.items()}), replica,
                        in_place=True)
    wrong = {"w": dense(torch.zeros(8, 512)), "b": dense(torch.zeros(299))}
    with pytest.raises(ValueError, match="gradient for 'b' has shape"):
        apply_aggregate(protocol, Downlink("dense"), Aggregate(0, wrong), replica, in_place=True)
    assert_replicas_equal(replica, before)


def test_a_protocol_without_an_in_place_step_gets_a_new_replica() -> None:
    co2 = DiLoCo(overlap=OverlapConfig(enabled=True, mode="co2"))
    assert co2.overlapped
    replica = Replica(0, _params())
    before = replica.copy()
    update = {n: rand(9, tuple(t.shape), 0.01) for n, t in replica.params.items()}
    assert co2.apply_in_place(update, replica) is None
    stepped = apply_aggregate(co2, Downlink("dense"), Aggregate(0, {n: dense(t) for n, t in update.items()}), replica,
                              in_place=True)
    assert_replicas_equal(replica, before)
    assert _pointers(stepped) != _pointers(replica)
    assert_replicas_equal(stepped, co2.apply(update, before))



def test_a_relayed_round_applies_the_aggregators_own_update_which_is_what_every_replica_folds_again(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Relayed, every replica folds the senders' updates again; the aggregator has their fold already and steps
    with it (no second fold, no dense copy of its mean), to the same bits as a worker's replica."""
    protocol = SparseLoCo()
    downlink = Downlink.from_config(DownlinkConfig(), protocol)
    aggregator = RoundAggregator(protocol, downlink, Replica(0, _params()), in_place=True)
    worker = aggregator.replica.copy()
    pointers = _pointers(aggregator.replica)
    _sparseloco_round(aggregator, 0, senders=2)  # two small updates: relaying them is smaller than their union

    def no_decode(*_: object) -> None:
        raise AssertionError("the aggregator decoded its own relayed aggregate")

    with monkeypatch.context() as patched:
        patched.setattr(Downlink, "decode", no_decode)
        aggregate = aggregator.close()
    assert aggregate.relayed and not aggregate.payloads
    assert _pointers(aggregator.replica) == pointers
    assert_replicas_equal(apply_aggregate(protocol, downlink, aggregate, worker), aggregator.replica)
