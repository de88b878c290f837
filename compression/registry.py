"""Codec names -> classes: build a compressor from plain parameters, decode any payload.

`build(codec, **params)` takes the union of all codecs' parameters (density, chunk, rank, seed,
value_dtype, range_sigmas) and hands each codec the ones it uses, so a caller can pass one config's
worth of parameters whatever the codec; a parameter no codec knows is an error. Codec "none" is an
alias for "dense" (the config's spelling of "no compression").
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from compression.base import Compressor, SparseCompressor
from compression.casts import Bf16, Dense, Fp16
from compression.lowrank import LowRank
from compression.payload import Payload, PayloadError
from compression.quantize import Int4, Int8
from compression.randomk import RandomK
from compression.sign import Sign
from compression.sparseloco import SparseLoCo
from compression.topk import ChunkedTopK, GlobalTopK
from compression.twobit import Int2

_CLASSES: tuple[type[Compressor], ...] = (
    Dense,
    Fp16,
    Bf16,
    ChunkedTopK,
    GlobalTopK,
    RandomK,
    Sign,
    Int8,
    Int4,
    Int2,
    LowRank,
    SparseLoCo,
)
CODECS: dict[str, type[Compressor]] = {cls.codec: cls for cls in _CLASSES}
ALIASES = {"none": "dense"}


def _params_of(cls: type[Compressor]) -> set[str]:
    return {name for name in inspect.signature(cls.__init__).parameters if name != "self"}


KNOWN_PARAMS = set().union(*(_params_of(cls) for cls in CODECS.values()))

# Decoding needs only the payload, so one default instance per codec serves every decode.
_DECODERS: dict[str, Compressor] = {name: cls() for name, cls in CODECS.items()}


def known_codecs() -> list[str]:
    return sorted([*CODECS, *ALIASES])


def build(codec: str, **params: Any) -> Compressor:
    """A compressor for `codec`, given any of the known parameters (those it does not use are ignored)."""
    name = ALIASES.get(codec, codec)
    if name not in CODECS:
        raise ValueError(f"unknown codec {codec!r}; known codecs: {', '.join(known_codecs())}")
    unknown = sorted(set(params) - KNOWN_PARAMS)
    if unknown:
        raise ValueError(f"unknown compression parameter(s) {unknown}; known: {sorted(KNOWN_PARAMS)}")
    cls = CODECS[name]
    own = _params_of(cls)
    return cls(**{k: v for k, v in params.items() if k in own})


def _decoder(p: Payload) -> Compressor:
    decoder = _DECODERS.get(p.codec)
    if decoder is None:
        raise PayloadError(f"payload codec {p.codec!r} is unknown; known codecs: {', '.join(sorted(CODECS))}")
    return decoder


def validate(p: Payload) -> None:
    """Raise PayloadError if `p` does not match its own header."""
    _decoder(p).validate(p)


def decode(p: Payload) -> torch.Tensor:
    """Validate `p`, then decode it to a tensor of its original shape and dtype."""
    return _decoder(p).decompress(p)


def sparse_view(p: Payload) -> tuple[torch.Tensor, torch.Tensor]:
    """(flat int64 indices, decoded values) of a sparse payload (topk, topk_global, randomk, sparseloco)."""
    decoder = _decoder(p)
    if not isinstance(decoder, SparseCompressor):
        sparse = sorted(n for n, d in _DECODERS.items() if isinstance(d, SparseCompressor))
        raise ValueError(f"codec {p.codec!r} is not sparse; sparse codecs: {', '.join(sparse)}")
    return decoder.sparse(p)


def sparse_views(payloads: list[Payload]) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """`sparse_view` of every payload, read together where their codec can (SparseLoCo: a few calls for all
    of them instead of a few per payload; the same tensors); None otherwise, or when any payload must be read
    on its own: `sparse_view` of each then gives the values or names the error."""
    codecs = {p.codec for p in payloads}
    if len(codecs) != 1:
        return None
    many = getattr(_DECODERS.get(codecs.pop()), "sparse_many", None)
    return many(payloads) if many is not None else None


def is_sparse(codec: str) -> bool:
    return isinstance(_DECODERS.get(ALIASES.get(codec, codec)), SparseCompressor)


def contraction(codec: str, **params: Any) -> float | None:
    """A lower bound on the codec's contraction delta, ||C(x) - x||^2 <= (1 - delta) ||x||^2, where one is
    known in closed form: 1 for the lossless and half-precision codecs, the kept fraction for the
    sparsifiers (top-k's bound; SparseLoCo's 2-bit values only loosen it). None for the quantizers, sign
    and low rank, whose delta depends on the tensor."""
    compressor = build(codec, **params)
    if isinstance(compressor, Dense | Fp16 | Bf16):
        return 1.0
    density = getattr(compressor, "density", None)
    return float(density) if isinstance(compressor, SparseCompressor) and density is not None else None
