"""`check_update` reads and checks a SparseLoCo update's tensors together (`protocols.check._checked_together`):
it accepts exactly what the tensor-by-tensor check accepts, decodes the same tensors, and for anything wrong
the tensor-by-tensor check names the problem, with nothing folded. The sparse fold then uses the check's sort
(`CheckedUpdate.order`) and gives the same bits as sorting again."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from compression.payload import Payload
from protocols import check
from protocols.base import Update
from protocols.check import check_update
from protocols.round import RoundAggregator, UpdateRejected
from protocols.sparse_mean import SparseMeanAccumulator
from protocols.sparseloco import SparseLoCo
from tests.unit.protocol_helpers import assert_same_state, dense_aggregator, rand, tensor_state

# Several tensors, full 4096-chunks and tails (a tail of 1 kept value, tensors of one chunk and of several).
SHAPES = {"w": (96, 128), "b": (300,), "e": (4096,), "t": (5000,)}
START = {name: rand(i, shape) for i, (name, shape) in enumerate(SHAPES.items())}


def _update(seed: int, weight: float = 1.0) -> Update:
    protocol = SparseLoCo()
    local = {n: t + 0.01 * rand(seed * 10 + i, t.shape) for i, (n, t) in enumerate(START.items())}
    update, _ = protocol.make_update(local, START, protocol.init_worker_state(START))
    return dataclasses.replace(update, weight=weight)


def _one_by_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(check, "_checked_together", lambda update, expect: None)


def test_reading_together_decodes_what_reading_one_by_one_does(monkeypatch: pytest.MonkeyPatch) -> None:
    aggregator = dense_aggregator(SparseLoCo(), START)
    update = _update(1)
    together = check_update("w0", update, aggregator.expect)
    _one_by_one(monkeypatch)
    alone = check_update("w0", update, aggregator.expect)
    assert together.order is not None and alone.order is None
    assert list(together.tensors) == list(alone.tensors) == list(SHAPES)
    for name, decoded in alone.tensors.items():
        got = together.tensors[name]
        assert got.shape == decoded.shape and got.indices is not None and decoded.indices is not None
        assert torch.equal(got.indices, decoded.indices) and torch.equal(got.values, decoded.values)
        assert got.values.dtype == torch.float32
    # The order sorts every tensor's indices laid end to end.
    starts, at = [], 0
    for shape in SHAPES.values():
        starts.append(at)
        at += torch.Size(shape).numel()
    flat = torch.cat([d.indices + s for d, s in zip(alone.tensors.values(), starts, strict=True)])  # type: ignore[operator]
    ordered = flat[together.order]
    assert bool((ordered[1:] > ordered[:-1]).all()) and ordered.numel() == flat.numel()


def _folded(updates: list[Update], presorted: bool) -> SparseMeanAccumulator:
    aggregator = dense_aggregator(SparseLoCo(), START)
    for k, update in enumerate(updates):
        checked = check_update(f"w{k}", update, aggregator.expect)
        aggregator.fold(f"w{k}", checked if presorted else dataclasses.replace(checked, order=None))
    assert isinstance(aggregator.acc, SparseMeanAccumulator) and aggregator.acc.sparse
    return aggregator.acc


def test_the_sparse_fold_with_the_checks_order_gives_the_same_bits_as_sorting_again() -> None:
    updates = [_update(k, weight=1.0 + k) for k in range(4)]
    assert_same_state(tensor_state(_folded(updates, presorted=False)), tensor_state(_folded(updates, presorted=True)))
    a, b = _folded(updates, False).mean(), _folded(updates, True).mean()
    assert all(torch.equal(a[n].view(-1).view(torch.int32), b[n].view(-1).view(torch.int32)) for n in a)


def _with(update: Update, name: str, **tensors: torch.Tensor) -> Update:
    payload: Payload = update.payloads[name]
    return dataclasses.replace(update, payloads={**update.payloads, name: dataclasses.replace(
        payload, tensors={**payload.tensors, **tensors})})


def _means(update: Update, name: str, value: float) -> Update:
    return _with(update, name, means=torch.full_like(update.payloads[name].tensors["means"], value))


def _indices_zeroed(update: Update, name: str) -> Update:
    return _with(update, name, indices=torch.zeros_like(update.payloads[name].tensors["indices"]))


def _indices_maxed(update: Update, name: str) -> Update:
    return _with(update, name, indices=torch.full_like(update.payloads[name].tensors["indices"], 255))


BAD = {
    "nan": (lambda u: _means(u, "t", float("nan")), r"tensor 't' contains NaN or Inf"),
    "inf": (lambda u: _means(u, "b", float("inf")), r"tensor 'b' contains NaN or Inf"),
    "over the bound": (lambda u: _means(u, "e", 60000.0), r"tensor 'e' holds a value of magnitude 6e\+04, over"),
    "repeated indices": (lambda u: _indices_zeroed(u, "w"), r"tensor 'w' repeats indices"),
    "index outside its chunk": (lambda u: _indices_maxed(u, "t"), r"tensor 't': .*"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_tensor_is_named_and_nothing_is_folded(case: str) -> None:
    aggregator: RoundAggregator = dense_aggregator(SparseLoCo(), START)
    aggregator.submit("w0", _update(1))
    before = tensor_state(aggregator.acc)
    make, message = BAD[case]
    with pytest.raises(UpdateRejected, match=message) as refused:
        aggregator.submit("w1", make(_update(2)))
    assert "worker w1" in str(refused.value)
    assert_same_state(before, tensor_state(aggregator.acc))
    assert aggregator.senders == ["w0"]
