"""The common codec interface and the header checks every codec shares.

A codec turns a tensor into a `Payload` and back. Decoding depends only on the payload (its `meta`
holds every scalar the decoder needs), so a receiver decodes with a default instance looked up by
`Payload.codec` (`compression.registry.decode`). `decompress` always runs `validate` first:
a payload that does not match its own header raises `PayloadError` naming the mismatch.

Payload tensors stay on the input's device (nothing here moves data between devices); decoded
tensors come back on the device of the payload's components.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from compression.chunks import num_chunks
from compression.payload import Payload, PayloadError

# Value dtypes a payload may name in its meta (wire-stable strings, not torch reprs).
DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


class Compressor(ABC):
    """compress(x) -> Payload; decompress(payload) -> tensor of the original shape and dtype.

    `key` names the tensor being compressed (e.g. the parameter name). Stateless codecs ignore it;
    stateful ones use it to keep per-tensor state (lowrank's warm start, randomk's seed stream).
    """

    codec: ClassVar[str]
    # Lossy codecs only make sense for floating-point tensors.
    floating_only: ClassVar[bool] = True

    def compress(self, x: torch.Tensor, key: str = "") -> Payload:
        if self.floating_only and not x.dtype.is_floating_point:
            raise ValueError(f"codec {self.codec!r} needs a floating-point tensor, got {x.dtype}")
        return self._encode(x.detach(), key)

    def decompress(self, p: Payload) -> torch.Tensor:
        self.validate(p)
        return self._decode(p)

    def compress_flat(self, flat: torch.Tensor, shapes: list[tuple[int, ...]]) -> tuple[list[Payload], torch.Tensor]:
        """Tensors of `shapes` laid end to end in the 1-D `flat`: (each one's payload, the decoded payloads laid
        out as `flat`). This default compresses and decodes them one by one; a codec that can encode many tensors
        in fewer calls overrides it with the same results."""
        payloads, decoded, offset = [], [], 0
        for shape in shapes:
            n = int(torch.Size(shape).numel())
            payloads.append(self.compress(flat[offset : offset + n].view(shape)))
            decoded.append(self.decompress(payloads[-1]).reshape(-1))
            offset += n
        return payloads, torch.cat(decoded) if decoded else flat.new_empty(0)

    def nbytes(self, p: Payload) -> int:
        """Bytes on the wire (component tensors; headers excluded)."""
        return p.nbytes()

    def validate(self, p: Payload) -> None:
        """Raise PayloadError naming the first way `p` fails to match its own header."""
        self._check_common(p)
        self._validate(p)

    def _check_common(self, p: Payload) -> None:
        if p.codec != self.codec:
            raise PayloadError(f"expected codec {self.codec!r}, got {p.codec!r}")
        if any((not isinstance(s, int)) or s < 0 for s in p.shape):
            raise PayloadError(f"{p.codec} payload has an invalid shape {p.shape}")
        if self.floating_only and not p.dtype.is_floating_point:
            raise PayloadError(f"{p.codec} payload claims non-floating dtype {p.dtype}")

    @abstractmethod
    def _encode(self, x: torch.Tensor, key: str) -> Payload: ...

    @abstractmethod
    def _decode(self, p: Payload) -> torch.Tensor: ...

    @abstractmethod
    def _validate(self, p: Payload) -> None: ...


class SparseCompressor(Compressor):
    """A codec that sends some coordinates and implicitly zeros the rest.

    `sparse(p)` gives (flat int64 indices, decoded values) so an aggregator can average each
    coordinate over the workers that actually sent it. Checking a sparse payload means unpacking its
    indices, so `_read` does both: it checks every header field and component before it returns, and
    `validate` is `sparse` with the result dropped (decoding never unpacks twice).
    """

    def sparse(self, p: Payload) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_common(p)
        return self._read(p)

    @abstractmethod
    def _read(self, p: Payload) -> tuple[torch.Tensor, torch.Tensor]:
        """Check `p` completely, then return its (flat int64 indices, values in p.dtype)."""

    def _validate(self, p: Payload) -> None:
        self._read(p)

    def decompress(self, p: Payload) -> torch.Tensor:
        self._check_common(p)
        return self._decode(p)  # `_read` checks every field before anything is decoded

    def _decode(self, p: Payload) -> torch.Tensor:
        indices, values = self._read(p)
        out = torch.zeros(p.numel, dtype=p.dtype, device=values.device)
        out[indices] = values
        return out.view(p.shape)


# ---- header helpers ---------------------------------------------------------------------------------


# Bounds on integers a payload header may carry: no tensor has more than 2^40 elements, and no codec chunks
# by more than 2^24 entries (a header from the wire is refused past them before anything is allocated).
MAX_META_INT = 1 << 40
MAX_CHUNK = 1 << 24


def meta_int(p: Payload, key: str, low: int = 0, high: int = MAX_META_INT) -> int:
    """An integer meta field in [low, high] (bools rejected)."""
    v = p.meta.get(key)
    if v is None:
        raise PayloadError(f"{p.codec} payload is missing meta field {key!r}")
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise PayloadError(f"{p.codec} payload meta {key!r}={v!r} is not an integer >= {low}")
    if v > high:
        raise PayloadError(f"{p.codec} payload meta {key!r}={v!r} is over the limit of {high}")
    return v


def meta_chunk(p: Payload, low: int = 1) -> int:
    """The header's chunk size, in [low, MAX_CHUNK]."""
    return meta_int(p, "chunk", low=low, high=MAX_CHUNK)


def check_chunk_size(chunk: int) -> None:
    """A codec's configured chunk size must be in [1, MAX_CHUNK] (what the decoder accepts)."""
    if not 1 <= chunk <= MAX_CHUNK:
        raise ValueError(f"chunk must be in [1, {MAX_CHUNK}], got {chunk}")


def per_entry_scales(scales: torch.Tensor, chunk: int, numel: int) -> torch.Tensor:
    """Each entry's chunk scale: entry i takes scales[i // chunk]. Indexing, not `repeat_interleave`, so the
    memory is numel, whatever chunk size a header names."""
    return scales[torch.arange(numel, device=scales.device) // chunk]


def meta_dtype(p: Payload, key: str) -> torch.dtype:
    name = p.meta.get(key)
    if not isinstance(name, str) or name not in DTYPES:
        raise PayloadError(f"{p.codec} payload meta {key!r}={name!r} is not one of {sorted(DTYPES)}")
    return DTYPES[name]


def component(p: Payload, name: str, dtype: torch.dtype, numel: int | None = None) -> torch.Tensor:
    """A 1-D component tensor of the given dtype (and length, when given)."""
    t = p.tensors.get(name)
    if t is None:
        raise PayloadError(f"{p.codec} payload is missing component {name!r}")
    if t.dtype != dtype:
        raise PayloadError(f"{p.codec} payload component {name!r} has dtype {t.dtype}, expected {dtype}")
    if t.dim() != 1:
        raise PayloadError(f"{p.codec} payload component {name!r} must be 1-D, got shape {tuple(t.shape)}")
    if numel is not None and t.numel() != numel:
        raise PayloadError(f"{p.codec} payload component {name!r} has {t.numel()} elements, header implies {numel}")
    return t


def check_chunks(p: Payload, chunk: int) -> int:
    """The header's chunk count must equal ceil(numel / chunk); returns it."""
    chunks = meta_int(p, "chunks")
    expected = num_chunks(p.numel, chunk)
    if chunks != expected:
        raise PayloadError(
            f"{p.codec} payload chunk count mismatch: header says {chunks} chunks, "
            f"numel {p.numel} / chunk {chunk} gives {expected}"
        )
    return chunks


def dtype_name(dtype: torch.dtype) -> str:
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"unsupported value dtype {dtype}; use one of {sorted(DTYPES)}")
    return DTYPE_NAMES[dtype]
