"""Payloads that do not match their own header are rejected, with a message naming the mismatch."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from compression import registry
from compression.packing import pack_bits, unpack_bits
from compression.payload import Payload, PayloadError

CHUNKED_SPARSE = ["topk", "sparseloco"]


def make(codec: str, numel: int = 4096 * 2 + 100, chunk: int = 4096, **params: object) -> Payload:
    x = torch.randn(numel, generator=torch.Generator().manual_seed(0))
    return registry.build(codec, chunk=chunk, **params).compress(x)


def with_tensor(p: Payload, name: str, t: torch.Tensor) -> Payload:
    return dataclasses.replace(p, tensors={**p.tensors, name: t})


def with_meta(p: Payload, **meta: int | float | str | bool) -> Payload:
    return dataclasses.replace(p, meta={**p.meta, **meta})


def rejects(p: Payload, message: str) -> None:
    """Both entry points refuse the payload, naming the problem."""
    with pytest.raises(PayloadError, match=message):
        registry.validate(p)
    with pytest.raises(PayloadError, match=message):
        registry.decode(p)


@pytest.mark.parametrize("codec", CHUNKED_SPARSE)
def test_packed_index_length_must_match_k_and_chunk_count(codec: str) -> None:
    p = make(codec)
    registry.validate(p)
    rejects(with_tensor(p, "indices", p.tensors["indices"][:-1]), "packed length mismatch: 'indices' has")
    rejects(with_meta(p, k=int(p.meta["k"]) + 1), "packed length mismatch")


def test_packed_code_length_must_match_the_kept_count() -> None:
    p = make("sparseloco")
    rejects(
        with_tensor(p, "codes", torch.cat((p.tensors["codes"], p.tensors["codes"][:1]))),
        "packed length mismatch: 'codes'",
    )


@pytest.mark.parametrize("codec", CHUNKED_SPARSE)
def test_chunk_count_must_match_numel_over_chunk(codec: str) -> None:
    p = make(codec)
    rejects(
        with_meta(p, chunks=int(p.meta["chunks"]) + 1),
        r"chunk count mismatch: header says 4 chunks, numel 8292 / chunk 4096 gives 3",
    )
    rejects(dataclasses.replace(p, shape=(4096 * 5,)), "chunk count mismatch")


@pytest.mark.parametrize("codec", CHUNKED_SPARSE)
def test_indices_must_lie_inside_their_chunk(codec: str) -> None:
    # Ragged tail: 100 entries, but a 12-bit index can say up to 4095.
    p = make(codec)
    kept = (8292 // 4096) * int(p.meta["k"]) + int(p.meta["k_last"])
    local = unpack_bits(p.tensors["indices"], 12, kept)
    local[-1] = 4000
    rejects(with_tensor(p, "indices", pack_bits(local, 12)), r"index out of range: 4000 >= last chunk's 100")
    # A chunk that is not a power of two: 13-bit indices can overshoot a full chunk too.
    q = make(codec, numel=5000 * 3, chunk=5000)
    local = unpack_bits(q.tensors["indices"], 13, 3 * int(q.meta["k"]))
    local[0] = 5000
    rejects(with_tensor(q, "indices", pack_bits(local, 13)), r"index out of range: 5000 >= chunk 5000")


@pytest.mark.parametrize("codec", CHUNKED_SPARSE)
def test_other_header_mismatches_are_named(codec: str) -> None:
    p = make(codec)
    rejects(with_meta(p, bits=11), "index bits 11 do not match chunk 4096")
    rejects(with_meta(p, k_last=101), "k_last=101 does not fit a last chunk of 100")
    rejects(
        dataclasses.replace(p, tensors={k: v for k, v in p.tensors.items() if k != "indices"}),
        "missing component 'indices'",
    )
    rejects(
        with_tensor(p, "indices", p.tensors["indices"].to(torch.int16)),
        "'indices' has dtype torch.int16, expected torch.uint8",
    )
    rejects(dataclasses.replace(p, meta={k: v for k, v in p.meta.items() if k != "k"}), "missing meta field 'k'")
    rejects(with_meta(p, k="61"), "meta 'k'='61' is not an integer")
    rejects(dataclasses.replace(p, codec="nope"), "payload codec 'nope' is unknown")


def test_value_components_are_checked() -> None:
    p = make("topk")
    rejects(
        with_tensor(p, "values", p.tensors["values"][:-1]), "component 'values' has 123 elements, header implies 124"
    )
    rejects(
        with_tensor(p, "values", p.tensors["values"].half()), "'values' has dtype torch.float16, expected torch.float32"
    )
    s = make("sparseloco")
    rejects(
        with_tensor(s, "means", s.tensors["means"].float()), "'means' has dtype torch.float32, expected torch.float16"
    )
    rejects(with_tensor(s, "means", s.tensors["means"][:-4]), "'means' has 8 elements, header implies 12")


def test_global_topk_and_randomk_headers() -> None:
    p = make("topk_global", density=0.01)
    bad = p.tensors["indices"].clone()
    bad[0] = 8292
    rejects(with_tensor(p, "indices", bad), r"index out of range: \[.*, 8292\] not within \[0, 8292\)")
    rejects(with_meta(p, k=9000), "k=9000 exceeds numel 8292")
    rejects(with_tensor(p, "indices", p.tensors["indices"].long()), "expected torch.int32")
    r = make("randomk", density=0.01)
    rejects(with_meta(r, seed=-1), "meta 'seed'=-1 is not an integer >= 0")
    rejects(with_tensor(r, "values", r.tensors["values"][:3]), "'values' has 3 elements")


def test_dense_codecs_check_the_shape_product() -> None:
    for codec in ("fp16", "bf16"):
        p = make(codec)
        rejects(
            dataclasses.replace(p, shape=(10, 10)),
            "shape product mismatch: shape \\(10, 10\\) has 100 elements, 'values' has 8292",
        )
    rejects(dataclasses.replace(make("dense"), shape=(3,)), "does not match header")
    low = registry.build("lowrank", rank=2).compress(torch.randn(20, 30))
    rejects(dataclasses.replace(low, shape=(20, 31)), r"shape product mismatch: rows 20 x cols 30 != numel 620")
    rejects(with_meta(low, rank=3), "component 'p' has 40 elements, header implies 60")
    rejects(with_meta(low, mode="svd"), "mode='svd'")


def test_quantized_codecs_check_chunks_and_lengths() -> None:
    for codec in ("int8", "int4", "int2", "sign"):
        p = make(codec)
        rejects(with_meta(p, chunks=7), "chunk count mismatch")
        first = next(iter(p.tensors))
        rejects(with_tensor(p, first, p.tensors[first][:-1]), first)
    rejects(with_tensor(make("int4"), "codes", make("int4").tensors["codes"][:-1]), "packed length mismatch: 'codes'")
    rejects(with_tensor(make("sign"), "signs", make("sign").tensors["signs"][:-1]), "packed length mismatch: 'signs'")


def test_decompress_of_a_codec_refuses_another_codecs_payload() -> None:
    with pytest.raises(PayloadError, match="expected codec 'topk', got 'sparseloco'"):
        registry.build("topk").decompress(make("sparseloco"))
