"""The batched SparseLoCo encoder and reader (compression/sparseloco_batch.py), error feedback's `step_all` and
the flat fold of SparseMeanAccumulator give exactly what the per-tensor code gives: the same payload bytes,
decoded values, error buffers and means."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from compression import registry
from compression.error_feedback import ErrorFeedback
from compression.payload import Payload, PayloadError
from compression.sparseloco import SparseLoCo
from compression.sparseloco_batch import encode_flat, row_safe
from protocols.base import CheckedUpdate, Decoded, Update
from protocols.compressed import decoded_update
from protocols.sparseloco import SparseMeanAccumulator

# The bench model's shapes (bench/overlap_runs.py MODEL), ragged ones, chunk multiples, and one-element tensors.
MODEL_SHAPES = [(80, 64), (64, 64), (64,), (64,), (192, 64), (64, 64), (64,), (64,), (256, 64), (64, 256), (64,), (64,)]
ODD_SHAPES = [(1,), (5,), (4096,), (4097,), (3, 4095), (8191,), (12288,), (2, 3, 700), (0,), (130,), (20000,)]


def same_payload(a: Payload, b: Payload) -> bool:
    return (
        (a.codec, a.shape, a.dtype, a.meta) == (b.codec, b.shape, b.dtype, b.meta)
        and a.tensors.keys() == b.tensors.keys()
        and all(a.tensors[k].dtype == b.tensors[k].dtype and torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    )


def tensors(shapes: list[tuple[int, ...]], seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g) * (0.1 + i) for i, s in enumerate(shapes)]


@pytest.mark.parametrize("density", [64 / 4096, 0.015, 0.001, 0.05, 0.5, 1.0])
@pytest.mark.parametrize("shapes", [MODEL_SHAPES, ODD_SHAPES], ids=["model", "odd"])
def test_encode_flat_makes_the_per_tensor_payloads(shapes: list[tuple[int, ...]], density: float) -> None:
    for seed in range(3):
        codec = SparseLoCo(density=density)
        xs = tensors(shapes, seed)
        flat = torch.cat([x.reshape(-1) for x in xs])
        payloads, decoded = encode_flat(codec, flat, shapes)
        want = [codec.compress(x) for x in xs]
        assert len(payloads) == len(want)
        for got, expected in zip(payloads, want, strict=True):
            assert same_payload(got, expected)
        assert torch.equal(decoded, torch.cat([codec.decompress(p).reshape(-1) for p in want]))


@pytest.mark.parametrize("chunk", [16, 100, 1024])
def test_encode_flat_other_chunks_including_row_unsafe_counts(chunk: int) -> None:
    shapes = [(7,), (chunk,), (chunk * 3 + 5,), (2 * chunk - 1,), (33,), (chunk * 2,)]
    for density in (0.13, 0.2, 0.3, 0.5):  # keeps 2..7 per chunk for some: the per-tensor fallback
        codec = SparseLoCo(density=density, chunk=chunk)
        xs = tensors(shapes, 7)
        payloads, decoded = encode_flat(codec, torch.cat([x.reshape(-1) for x in xs]), shapes)
        want = [codec.compress(x) for x in xs]
        assert all(same_payload(a, b) for a, b in zip(payloads, want, strict=True))
        assert torch.equal(decoded, torch.cat([codec.decompress(p).reshape(-1) for p in want]))


def test_row_safe_counts() -> None:
    assert row_safe(1) and row_safe(8) and row_safe(64)
    assert not any(row_safe(k) for k in range(2, 8))


def test_encode_flat_refuses_non_finite_values_as_compress_does() -> None:
    x = torch.randn(5000)
    x[17] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        encode_flat(SparseLoCo(), x, [(5000,)])


def test_step_all_is_step_name_by_name_over_rounds() -> None:
    names = [f"t{i}" for i in range(len(MODEL_SHAPES))]
    batched = ErrorFeedback(SparseLoCo(density=64 / 4096), "ef14", decay=0.95)
    single = ErrorFeedback(SparseLoCo(density=64 / 4096), "ef14", decay=0.95)
    for round_ in range(4):
        grads = dict(zip(names, tensors(MODEL_SHAPES, 100 + round_), strict=True))
        got = batched.step_all(grads)
        want = {n: single.step(n, g) for n, g in grads.items()}
        assert list(got) == names
        assert all(same_payload(got[n], want[n]) for n in names)
        for n in names:
            residual, expected = batched.residual(n), single.residual(n)
            assert residual is not None and expected is not None and torch.equal(residual, expected)


@pytest.mark.parametrize("shapes", [MODEL_SHAPES, ODD_SHAPES], ids=["model", "odd"])
def test_sparse_views_read_what_sparse_view_reads(shapes: list[tuple[int, ...]]) -> None:
    codec = SparseLoCo()
    payloads = [codec.compress(x) for x in tensors(shapes, 11)]
    got = registry.sparse_views(payloads)
    assert got is not None and len(got) == len(payloads)
    for (indices, values), p in zip(got, payloads, strict=True):
        want_indices, want_values = registry.sparse_view(p)
        assert indices.dtype == want_indices.dtype and torch.equal(indices, want_indices)
        assert values.dtype == want_values.dtype and torch.equal(values, want_values)


def corrupt(p: Payload, **changes: object) -> Payload:
    return replace(p, **changes)  # type: ignore[arg-type]


def test_sparse_views_leave_bad_payloads_to_the_single_reader() -> None:
    codec = SparseLoCo()
    good = [codec.compress(x) for x in tensors([(64,), (5000,)], 12)]
    out_of_range = good[0].tensors["indices"].clone()
    out_of_range[0] = 0xFF  # index 255 + high nibble >= the 64-entry last chunk
    out_of_range[1] |= 0x0F
    bad = [
        corrupt(good[1], tensors={**good[1].tensors, "indices": out_of_range[:1].clone()}),  # short
        corrupt(good[0], tensors={**good[0].tensors, "indices": out_of_range}),
        corrupt(good[1], meta={**good[1].meta, "k_last": 999}),
        corrupt(good[1], tensors={**good[1].tensors, "means": good[1].tensors["means"].float()}),
        corrupt(good[1], dtype=torch.int32),
    ]
    for b in bad:
        with pytest.raises(PayloadError):
            registry.sparse_view(b)
        assert registry.sparse_views([good[0], b]) is None
    assert registry.sparse_views([good[0], registry.build("topk").compress(torch.randn(10))]) is None


@pytest.mark.parametrize("over_all_workers", [False, True])
def test_flat_fold_sums_as_the_per_tensor_adds(over_all_workers: bool) -> None:
    """SparseMeanAccumulator folds a whole update into one flat buffer; the means are bit for bit those of
    adding tensor by tensor (`add`, as MedianClipAccumulator still does)."""
    shapes = {"a": (80, 64), "b": (64,), "c": (3, 5000)}
    flat, per_tensor = SparseMeanAccumulator(over_all_workers=over_all_workers), SparseMeanAccumulator(
        over_all_workers=over_all_workers)
    g = torch.Generator().manual_seed(5)
    for worker in range(4):
        tensors_ = {}
        for name, shape in shapes.items():
            numel = int(torch.Size(shape).numel())
            indices = torch.randperm(numel, generator=g)[: max(1, numel // 50)]
            tensors_[name] = Decoded(shape, torch.randn(indices.numel(), generator=g), indices)
        update = CheckedUpdate(tensors=tensors_, weight=1.0 + worker, raw=Update(payloads={}))
        flat.fold(f"w{worker}", update)
        for name, d in tensors_.items():
            assert d.indices is not None
            per_tensor.add(name, d.shape, d.indices, d.values, update.weight)
        per_tensor.workers.append(f"w{worker}")
        per_tensor.total_weight += update.weight
    got, want = flat.mean(), per_tensor.mean()
    assert list(got) == list(shapes)
    for name in shapes:
        assert got[name].shape == want[name].shape and torch.equal(got[name], want[name])
        assert torch.equal(flat.weights[name], per_tensor.weights[name])


def test_decoded_update_is_registry_decode_of_each_payload() -> None:
    codec = SparseLoCo()
    xs = tensors(MODEL_SHAPES + ODD_SHAPES, 21)
    update = Update(payloads={f"t{i}": codec.compress(x) for i, x in enumerate(xs)})
    got = decoded_update(update)
    assert list(got) == list(update.payloads)
    for name, payload in update.payloads.items():
        want = registry.decode(payload)
        assert got[name].shape == want.shape and got[name].dtype == want.dtype and torch.equal(got[name], want)
    assert decoded_update(None) == {}
