"""Every codec: round trips keep shape and dtype; each codec's own accuracy claim holds."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from compression import registry
from compression.lowrank import LowRank
from compression.payload import Payload

ALL_CODECS = sorted(registry.CODECS)
SHAPES = st.lists(st.integers(0, 9), min_size=0, max_size=3).map(tuple)  # 0-d, empty, 1-D .. 3-D
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def sample(shape: tuple[int, ...], seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)


def chunk_view(flat: torch.Tensor, chunk: int) -> torch.Tensor:
    """(chunks, chunk) with the ragged last chunk zero-padded (zeros change neither max|x| nor sums)."""
    pad = (-flat.numel()) % chunk
    return torch.nn.functional.pad(flat, (0, pad)).view(-1, chunk)


@settings(max_examples=50, deadline=None)
@given(
    codec=st.sampled_from(ALL_CODECS),
    shape=SHAPES,
    dtype=st.sampled_from(DTYPES),
    chunk=st.sampled_from([1, 7, 16, 4096]),
    seed=st.integers(0, 2**31 - 1),
)
def test_round_trip_keeps_shape_and_dtype(
    codec: str, shape: tuple[int, ...], dtype: torch.dtype, chunk: int, seed: int
) -> None:
    x = sample(shape, seed, dtype)
    compressor = registry.build(codec, density=0.25, chunk=chunk, rank=2)
    payload = compressor.compress(x, key="w")
    assert payload.codec == codec and payload.shape == tuple(shape) and payload.dtype == dtype
    assert compressor.nbytes(payload) == payload.nbytes()
    # A receiver that knows only the payload (a fresh default decoder) gets the same tensor.
    decoded = registry.decode(payload)
    assert decoded.shape == x.shape and decoded.dtype == x.dtype
    assert torch.equal(decoded, compressor.decompress(payload))
    assert bool(torch.isfinite(decoded).all())


@settings(max_examples=50, deadline=None)
@given(shape=SHAPES, seed=st.integers(0, 2**31 - 1))
def test_dense_and_none_are_exact(shape: tuple[int, ...], seed: int) -> None:
    x = sample(shape, seed)
    for name in ("dense", "none"):
        assert torch.equal(registry.decode(registry.build(name).compress(x)), x)
    ints = torch.arange(6).view(2, 3)
    assert torch.equal(registry.decode(registry.build("dense").compress(ints)), ints)


@settings(max_examples=50, deadline=None)
@given(shape=SHAPES, seed=st.integers(0, 2**31 - 1))
def test_half_precision_casts_are_within_their_rounding_error(shape: tuple[int, ...], seed: int) -> None:
    x = sample(shape, seed, torch.float64)
    # Round to nearest: relative error <= unit roundoff (2**-11 fp16, 2**-8 bf16); tiny absolute
    # slack for fp16 subnormals.
    for codec, rel, absolute in (("fp16", 2.0**-11, 2.0**-25), ("bf16", 2.0**-8, 0.0)):
        y = registry.decode(registry.build(codec).compress(x))
        assert bool(((y - x).abs() <= rel * x.abs() + absolute).all()), codec


@settings(max_examples=50, deadline=None)
@given(n=st.integers(0, 200), chunk=st.sampled_from([1, 5, 16, 64]), seed=st.integers(0, 2**31 - 1))
def test_absmax_quantizers_err_by_at_most_half_a_step(n: int, chunk: int, seed: int) -> None:
    x = sample((n,), seed) * 10
    for codec, qmax in (("int8", 127), ("int4", 7)):
        y = registry.decode(registry.build(codec, chunk=chunk).compress(x))
        step = chunk_view(x, chunk).abs().amax(dim=1, keepdim=True) / qmax
        err = chunk_view(y - x, chunk).abs()
        assert bool((err <= step / 2 * (1 + 1e-5) + 1e-7).all()), codec


@settings(max_examples=50, deadline=None)
@given(n=st.integers(1, 300), chunk=st.sampled_from([4, 16, 100]), seed=st.integers(0, 2**31 - 1))
def test_two_bit_levels_are_bin_means(n: int, chunk: int, seed: int) -> None:
    x = sample((n,), seed).double() * 3
    y = registry.decode(registry.build("int2", chunk=chunk).compress(x))
    fp16_slack = 2.0**-10  # the 4 bin means travel as float16
    for start in range(0, n, chunk):
        xc, yc = x[start : start + chunk], y[start : start + chunk]
        assert torch.unique(yc).numel() <= 4
        # Decoding to bin means preserves the chunk's sum (up to the float16 means) ...
        assert abs(float(yc.sum() - xc.sum())) <= fp16_slack * float(xc.abs().sum()) + 1e-9
        # ... and is never worse than sending the chunk's mean (a single bin).
        one_bin = float(((xc - xc.mean()) ** 2).sum())
        assert float(((yc - xc) ** 2).sum()) <= one_bin + fp16_slack**2 * float((xc**2).sum()) * 4 + 1e-12


def reference_chunk_topk(x: torch.Tensor, chunk: int, density: float) -> set[int]:
    """Kept flat indices by the spec, one chunk at a time (plain loop on purpose)."""
    kept: set[int] = set()
    flat = x.reshape(-1)
    for start in range(0, flat.numel(), chunk):
        part = flat[start : start + chunk]
        k = min(part.numel(), max(1, round(density * part.numel())))
        kept |= {start + int(i) for i in part.abs().topk(k).indices}
    return kept


@settings(max_examples=50, deadline=None)
@given(n=st.integers(0, 300), chunk=st.sampled_from([1, 7, 16, 100, 4096]), seed=st.integers(0, 2**31 - 1))
def test_chunked_topk_keeps_exactly_the_top_entries_of_every_chunk(n: int, chunk: int, seed: int) -> None:
    # Distinct magnitudes, so the top-k set is unique.
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randperm(n, generator=gen).double() + 1) * torch.where(torch.rand(n, generator=gen) < 0.5, -1, 1)
    expected = reference_chunk_topk(x, chunk, 0.1)
    for codec in ("topk", "sparseloco"):
        payload = registry.build(codec, density=0.1, chunk=chunk).compress(x)
        indices, values = registry.sparse_view(payload)
        assert indices.dtype == torch.int64 and indices.numel() == len(expected)
        assert set(indices.tolist()) == expected, codec
        if codec == "topk":  # values travel exactly
            assert torch.equal(values, x[indices])
        decoded = registry.decode(payload)
        assert torch.equal(decoded[indices], values)
        assert int((decoded != 0).sum()) <= len(expected)


def test_sparse_views_agree_with_decode() -> None:
    x = sample((37, 50), 3)
    for codec in ("topk", "topk_global", "randomk", "sparseloco"):
        payload = registry.build(codec, density=0.05, chunk=128).compress(x)
        indices, values = registry.sparse_view(payload)
        rebuilt = torch.zeros(x.numel(), dtype=x.dtype)
        rebuilt[indices] = values
        assert torch.equal(rebuilt.view_as(x), registry.decode(payload)), codec
        assert indices.unique().numel() == indices.numel()


def test_global_topk_keeps_the_largest_entries_of_the_whole_tensor() -> None:
    x = sample((40, 25), 5)
    payload = registry.build("topk_global", density=0.02).compress(x)
    indices, values = registry.sparse_view(payload)
    assert payload.tensors["indices"].dtype == torch.int32
    assert set(indices.tolist()) == set(x.reshape(-1).abs().topk(20).indices.tolist())
    assert torch.equal(values, x.reshape(-1)[indices])


def test_randomk_regenerates_indices_from_the_seed_alone() -> None:
    x = sample((1000,), 1)
    a, b = registry.build("randomk", density=0.01, seed=7), registry.build("randomk", density=0.01, seed=7)
    pa, pb = a.compress(x, key="w"), b.compress(x, key="w")
    assert "indices" not in pa.tensors and pa.nbytes() == 10 * 4
    # Same seed and key on two workers: the same coordinates; the next round draws new ones.
    ia, ib = registry.sparse_view(pa)[0], registry.sparse_view(pb)[0]
    assert torch.equal(ia, ib)
    assert not torch.equal(registry.sparse_view(a.compress(x, key="w"))[0], ia)
    assert not torch.equal(registry.sparse_view(a.compress(x, key="other"))[0], ia)
    assert torch.equal(registry.decode(pa)[ia], x[ia])


def test_sparseloco_payload_size_is_the_papers_budget() -> None:
    x = sample((4096 * 8 + 1000,), 2)
    payload = registry.build("sparseloco").compress(x)  # density 0.015 of 4096: k = 61 per chunk
    assert payload.meta["k"] == 61 and payload.meta["k_last"] == 15 and payload.meta["chunks"] == 9
    kept = 8 * 61 + 15
    assert payload.nbytes() == -(-kept * 12 // 8) + -(-kept * 2 // 8) + 9 * 4 * 2
    assert payload.nbytes() * 100 < x.numel() * 4


def test_lowrank_is_exact_on_low_rank_matrices_and_dense_on_tiny_ones() -> None:
    gen = torch.Generator().manual_seed(0)
    m = torch.randn(30, 2, generator=gen) @ torch.randn(2, 40, generator=gen)
    y = registry.decode(registry.build("lowrank", rank=2).compress(m))
    assert torch.allclose(y, m, atol=1e-4)
    for tiny in (torch.randn(5), torch.tensor(3.0), torch.randn(2, 3)):
        payload = registry.build("lowrank", rank=2).compress(tiny)
        assert payload.meta["mode"] == "dense" and torch.equal(registry.decode(payload), tiny)


def test_lowrank_warm_start_converges_to_the_best_rank_r_error() -> None:
    gen = torch.Generator().manual_seed(0)
    m = torch.randn(60, 4, 10, generator=gen)  # viewed as 60 x 40
    flat = m.reshape(60, 40).double()
    best = float((torch.linalg.svdvals(flat)[3:] ** 2).sum())  # optimal rank-3 error (Eckart-Young)
    warm = LowRank(rank=3)
    errors = [float(((registry.decode(warm.compress(m, key="w")) - m) ** 2).sum()) for _ in range(30)]
    assert errors[-1] <= best * 1.01
    assert errors[0] > best * 1.05  # a single cold iteration is far from it: the warm start is what helps
    kept_q = warm.warm_start("w")
    assert kept_q is not None and kept_q.shape == (40, 3)


def test_codecs_decode_on_the_device_of_their_components() -> None:
    x = sample((3, 100), 4)
    for codec in ALL_CODECS:
        payload = registry.build(codec, density=0.1, chunk=64).compress(x)
        assert all(t.device == x.device for t in payload.tensors.values())
        assert registry.decode(payload).device == x.device


def test_build_rejects_unknown_codecs_and_parameters_and_lossy_codecs_reject_integers() -> None:
    with pytest.raises(ValueError, match=r"unknown codec 'zip'; known codecs: .*sparseloco.*topk"):
        registry.build("zip")
    with pytest.raises(ValueError, match=r"unknown compression parameter\(s\) \['densty'\]"):
        registry.build("topk", densty=0.1)
    with pytest.raises(ValueError, match="density must be in"):
        registry.build("topk", density=0.0)
    with pytest.raises(ValueError, match="needs a floating-point tensor"):
        registry.build("int8").compress(torch.arange(4))
    # Parameters a codec does not use are accepted (one config's worth fits every codec).
    assert registry.build("fp16", density=0.5, rank=3).codec == "fp16"
    assert registry.build("none").codec == "dense"
    with pytest.raises(ValueError, match="codec 'int8' is not sparse"):
        registry.sparse_view(registry.build("int8").compress(torch.ones(3)))
    assert registry.is_sparse("sparseloco") and not registry.is_sparse("int2")


def test_payload_is_plain_data() -> None:
    payload = registry.build("sparseloco", chunk=16).compress(sample((100,), 9))
    assert isinstance(payload, Payload)
    assert all(isinstance(v, int | float | str | bool) for v in payload.meta.values())
    assert all(t.dim() == 1 for t in payload.tensors.values())
