"""Payloads <-> streams of `TensorChunk` messages, with the receiving side validated chunk by chunk.

Part of the serde layer (`serde.py` re-exports everything public here); like it, it is allowed to touch
the generated `_pb2` module. Each payload becomes one *entry*: an `EntrySpec` (codec, original shape and
dtype, meta, and the dtype/shape/byte length of every component tensor) riding on the entry's first
chunk, then the raw bytes of each component cut into chunks of at most `chunk_bytes`.

Consecutive chunks share a message (`batch_chunks`, sent as `TensorChunks`) while they add up to at most
BATCH_BYTES: a SparseLoCo update of a 10.75M-parameter GPT is 156 components of 0.1-10 KB, and each message cost
the receiving gRPC runtime far more than its bytes (bench/push_cost.py: about 0.1 ms of the coordinator's CPU
each, some 15 ms per push).

Throughput: the sender turns each component into bytes once and slices a memoryview; the receiver
copies every chunk straight into one preallocated buffer per component (allocated only after the
declared sizes passed the byte limit) and reinterprets it as the target dtype at the end. No
per-element Python work, so serde is never the bottleneck of a loopback stream.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from compression.payload import Payload, Scalar
from protocols.wire import lowband_pb2 as pb
from protocols.wire.messages import (
    DEFAULT_CHUNK_BYTES,
    MAX_CHUNK_BYTES,
    MAX_DIMS,
    MAX_ELEMENTS,
    WireError,
    WireTooLarge,
)

_TORCH_TO_PB: dict[torch.dtype, pb.DType.ValueType] = {
    torch.float32: pb.DTYPE_FLOAT32,
    torch.float64: pb.DTYPE_FLOAT64,
    torch.float16: pb.DTYPE_FLOAT16,
    torch.bfloat16: pb.DTYPE_BFLOAT16,
    torch.int8: pb.DTYPE_INT8,
    torch.uint8: pb.DTYPE_UINT8,
    torch.int16: pb.DTYPE_INT16,
    torch.int32: pb.DTYPE_INT32,
    torch.int64: pb.DTYPE_INT64,
    torch.bool: pb.DTYPE_BOOL,
    torch.complex64: pb.DTYPE_COMPLEX64,
}
_PB_TO_TORCH: dict[int, torch.dtype] = {v: k for k, v in _TORCH_TO_PB.items()}
SUPPORTED_DTYPES = tuple(_TORCH_TO_PB)
_INT64_RANGE = (-(1 << 63), (1 << 63) - 1)


def dtype_to_pb(dtype: torch.dtype, where: str) -> pb.DType.ValueType:
    if dtype not in _TORCH_TO_PB:
        allowed = ", ".join(str(d).removeprefix("torch.") for d in SUPPORTED_DTYPES)
        raise WireError(f"{where}: dtype {dtype} cannot travel on the wire (supported: {allowed})")
    return _TORCH_TO_PB[dtype]


def dtype_from_pb(value: int, where: str) -> torch.dtype:
    if value not in _PB_TO_TORCH:
        raise WireError(f"{where}: unknown dtype enum value {value}")
    return _PB_TO_TORCH[value]


def _scalar_to_pb(value: Scalar, where: str) -> pb.Scalar:
    # bool before int: a Python bool is an int, and must come back as a bool.
    if isinstance(value, bool):
        return pb.Scalar(bool_value=value)
    if isinstance(value, int):
        if not _INT64_RANGE[0] <= value <= _INT64_RANGE[1]:
            raise WireError(f"{where}: int {value} does not fit in int64")
        return pb.Scalar(int_value=value)
    if isinstance(value, float):
        return pb.Scalar(double_value=value)
    if isinstance(value, str):
        return pb.Scalar(string_value=value)
    raise WireError(f"{where}: meta value of type {type(value).__name__} is not int, float, str or bool")


def _scalar_from_pb(value: pb.Scalar, where: str) -> Scalar:
    kind = value.WhichOneof("value")
    if kind is None:
        raise WireError(f"{where}: meta scalar has no value set")
    result: Scalar = getattr(value, kind)
    return result


def _shape(dims: Iterable[int], where: str) -> tuple[int, ...]:
    """A shape from the wire: at most MAX_DIMS dimensions, each in [0, MAX_ELEMENTS], and at most
    MAX_ELEMENTS elements counting only the non-zero dimensions (so [2^62, 2^62, 0] is refused too)."""
    shape = tuple(int(d) for d in dims)
    if len(shape) > MAX_DIMS:
        raise WireError(f"{where}: shape has {len(shape)} dimensions, at most {MAX_DIMS} are allowed")
    if any(d < 0 for d in shape):
        raise WireError(f"{where}: negative dimension in shape {shape}")
    if _numel(tuple(d for d in shape if d)) > MAX_ELEMENTS:
        raise WireTooLarge(f"{where}: shape {list(shape)} is over the limit of {MAX_ELEMENTS} elements")
    return shape


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _as_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's elements as one flat byte view (C order, native = little-endian byte order)."""
    flat = tensor.detach().cpu().resolve_conj().resolve_neg().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().data


def _entry_spec(name: str, payload: Payload) -> pb.EntrySpec:
    where = f"entry {name!r}"
    spec = pb.EntrySpec(codec=payload.codec, shape=payload.shape, dtype=dtype_to_pb(payload.dtype, where))
    for key, value in payload.meta.items():
        spec.meta[key].CopyFrom(_scalar_to_pb(value, f"{where} meta {key!r}"))
    for comp, tensor in payload.tensors.items():
        cdtype = dtype_to_pb(tensor.dtype, f"{where} component {comp!r}")
        nbytes = tensor.numel() * tensor.element_size()
        spec.components.add(name=comp, dtype=cdtype, shape=tuple(tensor.shape), byte_length=nbytes)
    return spec


def encode_entries(entries: Mapping[str, Payload], chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[pb.TensorChunk]:
    """Cut payloads into `TensorChunk`s of at most `chunk_bytes` data bytes, spec on each entry's first chunk.

    Zero-length components send no chunk (their spec says 0 bytes); an entry with no data at all sends
    one spec-only chunk with an empty component name.
    """
    if sys.byteorder != "little":
        raise WireError("the wire carries little-endian bytes; big-endian hosts are not supported")
    if not 1 <= chunk_bytes <= MAX_CHUNK_BYTES:
        raise WireError(f"chunk_bytes must be in [1, {MAX_CHUNK_BYTES}], got {chunk_bytes}")
    for name, payload in entries.items():
        if not name:
            raise WireError("entry name must not be empty")
        spec: pb.EntrySpec | None = _entry_spec(name, payload)
        for comp, tensor in payload.tensors.items():
            data = _as_bytes(tensor)
            for offset in range(0, len(data), chunk_bytes):
                chunk = pb.TensorChunk(
                    entry=name, component=comp, offset=offset, data=bytes(data[offset : offset + chunk_bytes])
                )
                if spec is not None:
                    chunk.spec.CopyFrom(spec)
                    spec = None
                yield chunk
        if spec is not None:
            yield pb.TensorChunk(entry=name, spec=spec)


# Serialized bytes of chunks one message carries together. Small beside the chunk size on purpose: every message
# a stream has in flight is held, serialized, in gRPC's buffers, and a coordinator sends a round's aggregate to
# dozens of pulls at once (1 MiB batches grew its resident set at 100 workers; BENCHMARKS.md "Coordinator scale").
BATCH_BYTES = 64 << 10


def batch_chunks(chunks: Iterable[pb.TensorChunk], chunk_bytes: int) -> Iterator[list[pb.TensorChunk]]:
    """Consecutive `chunks` grouped, in order, while a group's serialized chunks add up to at most `chunk_bytes`
    (a chunk bigger than that goes alone, as it did in a message of its own), so no message grows."""
    batch: list[pb.TensorChunk] = []
    size = 0
    for chunk in chunks:
        n = chunk.ByteSize()
        if batch and size + n > chunk_bytes:
            yield batch
            batch, size = [], 0
        batch.append(chunk)
        size += n
    if batch:
        yield batch


@dataclass
class _Component:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    buffer: torch.Tensor  # uint8, byte_length long
    received: int = 0

    def __post_init__(self) -> None:
        self.array = self.buffer.numpy()  # shares memory: chunks are copied in through it

    @property
    def byte_length(self) -> int:
        return self.buffer.numel()


@dataclass
class _Entry:
    codec: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    meta: dict[str, Scalar]
    components: dict[str, _Component] = field(default_factory=dict)


class EntryAssembler:
    """Rebuilds payloads from `TensorChunk`s, rejecting any chunk that disagrees with what came before.

    `expected_entries`: how many entries the stream's header announced.
    `max_total_bytes`: the most component bytes the stream may declare; checked when each spec
    arrives, before its buffers are allocated, so an oversized stream costs no memory.
    """

    def __init__(self, expected_entries: int, max_total_bytes: int) -> None:
        self.expected_entries = expected_entries
        self.max_total_bytes = max_total_bytes
        self.declared_bytes = 0
        self.received_bytes = 0
        self._entries: dict[str, _Entry] = {}

    def feed(self, chunk: pb.TensorChunk) -> None:
        name = chunk.entry
        if not name:
            raise WireError("tensor chunk has an empty entry name")
        if chunk.HasField("spec"):
            if name in self._entries:
                raise WireError(f"entry {name!r} was sent twice (a second chunk carries its spec)")
            entry = self._start(name, chunk.spec)
        elif name in self._entries:
            entry = self._entries[name]
        else:
            raise WireError(f"a chunk of entry {name!r} arrived before the chunk carrying its spec")
        data = chunk.data
        if len(data) > MAX_CHUNK_BYTES:
            raise WireTooLarge(f"entry {name!r}: a chunk of {len(data)} bytes, over the limit of {MAX_CHUNK_BYTES}")
        if not data and not chunk.HasField("spec"):
            raise WireError(f"entry {name!r}: a chunk carries neither a spec nor data")
        if not chunk.component:
            if data:
                raise WireError(f"entry {name!r}: chunk with data names no component")
            return
        comp = entry.components.get(chunk.component)
        if comp is None:
            raise WireError(
                f"entry {name!r}: chunk for component {chunk.component!r}, "
                f"but its spec declares {sorted(entry.components)}"
            )
        where = f"entry {name!r} component {comp.name!r}"
        if chunk.offset != comp.received:
            raise WireError(
                f"{where}: chunk at byte offset {chunk.offset}, expected {comp.received} (chunks must be contiguous)"
            )
        end = comp.received + len(data)
        if end > comp.byte_length:
            raise WireError(f"{where}: chunk ends at byte {end}, past the declared length {comp.byte_length}")
        comp.array[comp.received : end] = np.frombuffer(data, dtype=np.uint8)
        comp.received = end
        self.received_bytes += len(data)

    def _start(self, name: str, spec: pb.EntrySpec) -> _Entry:
        where = f"entry {name!r}"
        if len(self._entries) >= self.expected_entries:
            raise WireError(f"{where} is more than the {self.expected_entries} entries the header declared")
        if not spec.codec:
            raise WireError(f"{where}: spec has no codec")
        # Sorted: protobuf maps keep no order, and a deterministic one makes payloads compare and print alike.
        meta = {key: _scalar_from_pb(spec.meta[key], f"{where} meta {key!r}") for key in sorted(spec.meta)}
        entry = _Entry(spec.codec, _shape(spec.shape, where), dtype_from_pb(spec.dtype, where), meta)
        layouts: list[tuple[str, torch.dtype, tuple[int, ...], int]] = []
        for cspec in spec.components:
            cwhere = f"{where} component {cspec.name!r}"
            if not cspec.name or any(cspec.name == c[0] for c in layouts):
                raise WireError(f"{cwhere}: component names must be non-empty and unique")
            dtype = dtype_from_pb(cspec.dtype, cwhere)
            shape = _shape(cspec.shape, cwhere)
            needed = _numel(shape) * dtype.itemsize
            if cspec.byte_length != needed:
                raise WireError(
                    f"{cwhere}: declares {cspec.byte_length} bytes, but shape {shape} of {dtype} needs {needed}"
                )
            layouts.append((cspec.name, dtype, shape, needed))
        total = self.declared_bytes + sum(layout[3] for layout in layouts)
        if total > self.max_total_bytes:
            raise WireTooLarge(
                f"{where} brings the stream to {total} bytes, over the limit of {self.max_total_bytes}")
        self.declared_bytes = total
        for cname, dtype, shape, nbytes in layouts:
            buffer = torch.empty(nbytes, dtype=torch.uint8)
            entry.components[cname] = _Component(cname, dtype, shape, buffer)
        self._entries[name] = entry
        return entry

    def finish(self) -> dict[str, Payload]:
        """The assembled payloads, in arrival order; raises if anything declared is missing."""
        if len(self._entries) != self.expected_entries:
            raise WireError(f"stream ended after {len(self._entries)} entries, expected {self.expected_entries}")
        payloads = {}
        for name, entry in self._entries.items():
            tensors = {}
            for comp in entry.components.values():
                if comp.received != comp.byte_length:
                    raise WireError(
                        f"entry {name!r} component {comp.name!r} is incomplete: "
                        f"got {comp.received} of {comp.byte_length} bytes"
                    )
                tensors[comp.name] = _to_tensor(comp, f"entry {name!r} component {comp.name!r}")
            payloads[name] = Payload(entry.codec, entry.shape, entry.dtype, tensors, entry.meta)
        return payloads


def _to_tensor(comp: _Component, where: str) -> torch.Tensor:
    if comp.dtype == torch.bool and bool((comp.buffer > 1).any()):
        # Any byte but 0 or 1 is not a valid torch.bool; reading it would be undefined behaviour.
        raise WireError(f"{where}: bool tensor holds bytes other than 0 and 1")
    # The buffer is ours alone, so it can be reinterpreted in place instead of copied.
    try:
        return comp.buffer.view(comp.dtype).reshape(comp.shape)
    except RuntimeError as err:  # the shape was bounded on arrival; this is a last line, never an UNKNOWN
        raise WireError(f"{where}: shape {list(comp.shape)} does not hold its bytes: {err}") from None
