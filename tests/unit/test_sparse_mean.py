"""SparseMeanAccumulator's sparse form gives the same bits as a plain dense fold (the form it had before, written
out here as the reference): sums, sender weights and means, through the switch to dense, for both averaging
rules, and when an update names a tensor outside the first one's layout."""

from __future__ import annotations

import pytest
import torch

from protocols.base import CheckedUpdate, Decoded, Update
from protocols.downlink import Downlink
from protocols.sparse_mean import MEAN_SLICE, SPARSE_UP_TO, SparseMean, SparseMeanAccumulator

SHAPES = {"a": (40, 50), "b": (3000,), "c": (7,)}


def _update(gen: torch.Generator, density: float, weight: float, names: tuple[str, ...] = ("a", "b", "c"),
            shapes: dict[str, tuple[int, ...]] = SHAPES) -> CheckedUpdate:
    tensors = {}
    for name in names:
        numel = int(torch.Size(shapes[name]).numel())
        k = max(1, int(density * numel))
        indices = torch.randperm(numel, generator=gen)[:k]
        values = torch.randn(k, generator=gen)
        values[::5] = -0.0  # a sum from 0.0 is +0.0 there: the sparse form must not keep -0.0
        values[1::7] = 0.0
        tensors[name] = Decoded(shapes[name], values, indices)
    return CheckedUpdate(tensors, weight, Update(payloads={}))


def _reference(updates: list[CheckedUpdate], over_all_workers: bool) -> tuple[dict[str, torch.Tensor], ...]:
    """The dense fold: per tensor, zeros, then index_add of value * weight and of weight, in fold order."""
    sums: dict[str, torch.Tensor] = {}
    weights: dict[str, torch.Tensor] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for update in updates:
        for name, d in update.tensors.items():
            assert d.indices is not None
            if name not in sums:
                numel = int(torch.Size(d.shape).numel())
                sums[name], weights[name], shapes[name] = torch.zeros(numel), torch.zeros(numel), d.shape
            sums[name].index_add_(0, d.indices, d.values * update.weight)
            weights[name].index_add_(0, d.indices, torch.full_like(d.values, update.weight))
    total_weight = sum(u.weight for u in updates)
    means = {n: (s / total_weight if over_all_workers else s / torch.where(weights[n] > 0, weights[n],
                                                                             torch.ones_like(weights[n])))
             .view(shapes[n]) for n, s in sums.items()}
    return sums, weights, means


def _same_bits(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    def bits(t: torch.Tensor) -> torch.Tensor:
        return t.contiguous().view(torch.int32)

    return a.keys() == b.keys() and all(a[n].shape == b[n].shape and torch.equal(bits(a[n]), bits(b[n])) for n in a)


@pytest.mark.parametrize("over_all_workers", [False, True])
@pytest.mark.parametrize("density", [0.002, 0.02, 0.3])
def test_the_mean_is_the_dense_folds_bit_for_bit(density: float, over_all_workers: bool) -> None:
    gen = torch.Generator().manual_seed(int(density * 1000) + over_all_workers)
    updates = [_update(gen, density, weight) for weight in (1.0, 0.3, 2.5, 1.0, 0.7, 1e-3, 3.0, 1.0)]
    acc = SparseMeanAccumulator(over_all_workers=over_all_workers)
    was_sparse = []
    for k, update in enumerate(updates):
        acc.fold(f"w{k}", update)
        was_sparse.append(acc.sparse)
    sums, weights, means = _reference(updates, over_all_workers)
    assert _same_bits(acc.mean(), means)
    assert acc.total_weight == sum(u.weight for u in updates) and acc.count == len(updates)
    numel = sum(int(torch.Size(s).numel()) for s in SHAPES.values())
    if density * len(updates) * SPARSE_UP_TO < 1:  # few coordinates: it never had to turn dense
        assert all(was_sparse) and acc.sparse
    if density * SPARSE_UP_TO > 1:  # one update passes the bound: dense from the first fold
        assert not any(was_sparse)
    assert _same_bits(acc.sums, sums) and _same_bits(acc.weights, weights)  # reading them makes it dense
    assert not acc.sparse and numel == sum(t.numel() for t in acc.sums.values())
    assert _same_bits(acc.mean(), means)


def test_it_turns_dense_midway_with_the_same_bits() -> None:
    gen = torch.Generator().manual_seed(3)
    density = 1.5 / (SPARSE_UP_TO * 4)  # the union passes 1/SPARSE_UP_TO after a few updates
    updates = [_update(gen, density, 1.0 + k / 3) for k in range(8)]
    acc = SparseMeanAccumulator()
    states = []
    for k, update in enumerate(updates):
        acc.fold(f"w{k}", update)
        states.append(acc.sparse)
    assert states[0] and not states[-1]  # sparse first, dense by the end
    assert _same_bits(acc.mean(), _reference(updates, False)[2])
    acc.fold("late", updates[0])  # folding goes on in the dense form
    assert _same_bits(acc.mean(), _reference([*updates, updates[0]], False)[2])


def test_an_update_outside_the_first_layout_folds_per_tensor() -> None:
    gen = torch.Generator().manual_seed(4)
    shapes = {**SHAPES, "d": (11,)}
    updates = [_update(gen, 0.01, 1.0, ("a", "b")), _update(gen, 0.01, 2.0, ("a", "d"), shapes),
               _update(gen, 0.01, 0.5, ("b",))]
    acc = SparseMeanAccumulator()
    for k, update in enumerate(updates):
        acc.fold(f"w{k}", update)
    assert not acc.sparse  # the one outside the layout made it dense
    assert _same_bits(acc.mean(), _reference(updates, False)[2])


def test_the_division_goes_slice_by_slice_with_the_same_bits() -> None:
    gen = torch.Generator().manual_seed(5)
    shapes = {"big": (MEAN_SLICE * 2 + 123,)}
    updates = [_update(gen, 0.2, w, ("big",), shapes) for w in (1.0, 0.25, 3.0)]
    acc = SparseMeanAccumulator()
    for k, update in enumerate(updates):
        acc.fold(f"w{k}", update)
    assert not acc.sparse
    assert _same_bits(acc.mean(), _reference(updates, False)[2])


def test_an_empty_round_has_no_mean() -> None:
    with pytest.raises(ValueError, match="no updates"):
        SparseMeanAccumulator().mean()


def test_updates_whose_coordinates_are_all_kept_already_add_in_place_with_the_same_bits() -> None:
    gen = torch.Generator().manual_seed(6)
    first, second = _update(gen, 0.01, 1.0), _update(gen, 0.01, 0.5)
    updates = [first, second, first, second, first]  # from the third on, every coordinate is kept already
    acc = SparseMeanAccumulator()
    for k, update in enumerate(updates):
        acc.fold(f"w{k}", update)
    assert acc.sparse
    assert _same_bits(acc.mean(), _reference(updates, False)[2])


def test_a_sparse_mean_is_built_tensor_by_tensor_and_sends_the_dense_means_union() -> None:
    """While sparse, the mean is a `SparseMean`: no dense copy of the model until a tensor is read, and the sparse
    downlink's union made from its entries is the very payload `union_payload` makes of the dense mean: the
    same kinds, shapes, metadata, indices and value bits, with coordinates whose senders cancel out (mean 0.0)
    left out as `torch.nonzero` leaves them, and a tensor past half nonzero sent dense."""
    gen = torch.Generator().manual_seed(7)
    updates = [_update(gen, 0.01, weight) for weight in (1.0, 0.5, 2.0)]
    cancel = updates[0].tensors["a"]
    # A fourth sender takes back exactly what the first sent to `a`: those means are 0.0 (or NaN-free 0/w).
    updates.append(CheckedUpdate({"a": Decoded(SHAPES["a"], -cancel.values, cancel.indices)}, 1.0, Update({})))
    # A fifth fills most of `c`: its union is sent dense.
    updates.append(CheckedUpdate({"c": Decoded(SHAPES["c"], torch.arange(1.0, 7.0), torch.arange(6))}, 1.0,
                                 Update({})))
    acc = SparseMeanAccumulator()
    for k, update in enumerate(updates):
        acc.fold(f"w{k}", update)
    assert acc.sparse
    mean = acc.mean()
    assert isinstance(mean, SparseMean) and not isinstance(mean, dict)
    _, _, reference = _reference(updates, over_all_workers=False)
    assert _same_bits(dict(mean.items()), reference)
    sparse, _ = Downlink("sparse").encode(0, mean, None, None)
    expected, _ = Downlink("sparse").encode(0, reference, None, None)
    assert list(sparse.payloads) == list(expected.payloads) == ["a", "b", "c"]
    assert sparse.payloads["c"].codec == "dense" and sparse.payloads["a"].codec == "topk_global"
    assert sparse.payloads["a"].meta["k"] < int(torch.count_nonzero(torch.stack([
        torch.zeros(2000).index_fill_(0, u.tensors["a"].indices, 1.0) for u in updates if "a" in u.tensors]).sum(0)))
    for name, payload in sparse.payloads.items():
        other = expected.payloads[name]
        assert (payload.codec, payload.shape, payload.dtype, payload.meta) == (other.codec, other.shape, other.dtype,
                                                                               other.meta)
        assert payload.tensors.keys() == other.tensors.keys()
        for key, tensor in payload.tensors.items():
            assert tensor.dtype == other.tensors[key].dtype
            assert torch.equal(tensor.contiguous().view(torch.uint8), other.tensors[key].contiguous().view(torch.uint8))
