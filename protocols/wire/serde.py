"""The only bridge between lowband's plain data and the generated `_pb2` messages.

- `to_pb` / `from_pb`: the dataclasses of `messages.py` <-> protobuf messages, validating what comes in
  (a missing envelope, an unset or unknown enum value, a non-finite weight -> `WireError` naming the field).
- `push_stream` / `read_push`, `pull_stream` / `read_pull`: a header plus payloads <-> the message streams
  of the PushUpdate and PullState RPCs (tensor chunking lives in `tensor_chunks.py`).
- `aggregate_stream` / `read_aggregate`: one round's `Aggregate` <-> the PullAggregate stream;
  `EncodedAggregate`: that stream encoded once, shared by every pull of the round.
- `peer_stream` / `read_peer`: one gossip message (a `PeerHeader` plus payloads) <-> the Gossip stream of
  the Peer service, which workers of a gossip run serve to each other.
- `state_hash`: the replica digest, so every worker can check it holds the same replica.
- `update_to_bytes` / `update_from_bytes`: one update (payloads + weight) <-> a single self-checking byte
  string, for transports that move opaque buffers (the torch all-gather of `worker/transports/allgather.py`).

The coordinator and the worker import from here (and `messages.py`) and never from `lowband_pb2`.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import struct
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeVar, overload

import torch
from google.protobuf.message import DecodeError

from compression.payload import Payload, PayloadError, dense_values
from protocols.base import Aggregate, Update
from protocols.replica import digest
from protocols.wire import lowband_pb2 as pb
from protocols.wire import messages as m
from protocols.wire.messages import (
    DEFAULT_CHUNK_BYTES,
    GRPC_OPTIONS,
    MAX_CHUNK_BYTES,
    MAX_ENTRIES,
    MAX_MESSAGE_BYTES,
    MAX_METRICS,
    MAX_WIRE_INT,
    MAX_WIRE_STRING,
    PushHeader,
    StateHeader,
    WireError,
    WireTooLarge,
)
from protocols.wire.tensor_chunks import BATCH_BYTES, EntryAssembler, batch_chunks, encode_entries

__all__ = [
    "BATCH_BYTES",
    "GRPC_OPTIONS",
    "MAX_MESSAGE_BYTES",
    "EncodedAggregate",
    "EntryAssembler",
    "WireError",
    "WireTooLarge",
    "aggregate_entries",
    "aggregate_from_entries",
    "aggregate_stream",
    "batch_chunks",
    "encode_entries",
    "from_pb",
    "peer_stream",
    "pull_stream",
    "push_stream",
    "read_aggregate",
    "read_peer",
    "read_pull",
    "read_push",
    "state_hash",
    "to_pb",
    "update_from_bytes",
    "update_to_bytes",
]

_MESSAGE_TYPES: tuple[type, ...] = (
    m.Envelope, m.JoinRequest, m.JoinReply, m.HeartbeatRequest, m.HeartbeatReply, m.LeaveRequest,
    m.LeaveReply, m.AttestRequest, m.AttestReply, m.PullRequest, m.StateHeader, m.PushHeader, m.PushReply,
    m.ReserveRequest, m.ReserveReply,
    m.WaitRequest, m.RoundInfo, m.StatusRequest, m.WorkerStatus, m.StatusReply,
    m.AggregateRequest, m.AggregateHeader, m.EnrollRequest, m.EnrollReply, m.RosterRequest, m.RosterReply,
    m.ReportRequest, m.ReportReply, m.PeerHeader, m.PeerAck,
)  # fmt: skip
# Dataclasses and protobuf messages share their names, so the pairing is by name.
_BY_PB_NAME: dict[str, type] = {cls.__name__: cls for cls in _MESSAGE_TYPES}
# Python enum <-> proto enum value; 0 (*_UNSPECIFIED) is deliberately absent, so it is rejected.
_ENUMS: dict[type[enum.Enum], dict[enum.Enum, int]] = {
    m.Phase: {
        m.Phase.WAITING_FOR_WORKERS: pb.PHASE_WAITING_FOR_WORKERS,
        m.Phase.TRAINING: pb.PHASE_TRAINING,
        m.Phase.FINISHED: pb.PHASE_FINISHED,
    },
    m.PushKind: {m.PushKind.UPDATE: pb.PUSH_KIND_UPDATE, m.PushKind.INITIAL_STATE: pb.PUSH_KIND_INITIAL_STATE},
}
_ENUMS_FROM_PB = {cls: {v: k for k, v in table.items()} for cls, table in _ENUMS.items()}

Msg = TypeVar("Msg", bound=m.Message)


def to_pb(msg: m.Message) -> Any:
    """The protobuf message for a message dataclass (e.g. `messages.JoinRequest` -> `lowband_pb2.JoinRequest`)."""
    name = type(msg).__name__
    if _BY_PB_NAME.get(name) is not type(msg):
        raise WireError(f"{name} is not a wire message dataclass")
    out = getattr(pb, name)()
    for f in dataclasses.fields(msg):
        value = getattr(msg, f.name)
        try:
            if f.name == "envelope":
                out.envelope.CopyFrom(to_pb(value))
            elif isinstance(value, enum.Enum):
                setattr(out, f.name, _ENUMS[type(value)][value])
            elif isinstance(value, dict):
                getattr(out, f.name).update(value)
            elif isinstance(value, tuple) and value and dataclasses.is_dataclass(value[0]):
                getattr(out, f.name).extend(to_pb(item) for item in value)  # repeated message
            elif isinstance(value, tuple):
                getattr(out, f.name).extend(value)
            else:
                setattr(out, f.name, value)
        except (TypeError, ValueError) as exc:
            raise WireError(f"{name}.{f.name}: cannot encode {value!r}: {exc}") from exc
    return out


@overload
def from_pb(message: Any, expected: type[Msg]) -> Msg: ...
@overload
def from_pb(message: Any, expected: None = None) -> m.Message: ...
def from_pb(message: Any, expected: type[Any] | None = None) -> Any:
    """The message dataclass for a received protobuf message, validated.

    `expected`, when given, is the dataclass the caller needs; any other message type is a WireError.
    """
    name = message.DESCRIPTOR.name
    cls = _BY_PB_NAME.get(name)
    if cls is None or (expected is not None and cls is not expected):
        wanted = expected.__name__ if expected is not None else "a wire message"
        raise WireError(f"expected {wanted}, got protobuf message {name}")
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        where = f"{name}.{f.name}"
        if f.name == "envelope":
            if not message.HasField("envelope"):
                raise WireError(f"{where} is missing")
            values[f.name] = from_pb(message.envelope, m.Envelope)
        elif f.name in ("phase", "kind"):
            enum_cls = m.Phase if f.name == "phase" else m.PushKind
            raw = getattr(message, f.name)
            if raw not in _ENUMS_FROM_PB[enum_cls]:
                raise WireError(f"{where}: unset or unknown {enum_cls.__name__} value {raw}")
            values[f.name] = _ENUMS_FROM_PB[enum_cls][raw]
        elif f.name == "metrics":
            values[f.name] = dict(message.metrics)
            if len(values[f.name]) > MAX_METRICS or any(len(k) > 256 for k in values[f.name]):
                raise WireError(f"{where}: at most {MAX_METRICS} metrics, named in at most 256 characters")
            if cls is m.ReportRequest:  # a push's metrics are judged by the state machine; a report's only here
                bad = {k: v for k, v in values[f.name].items() if not math.isfinite(v)}
                if bad:
                    raise WireError(f"{where} must be finite, got {bad}")
        elif cls is m.StatusReply and f.name == "workers":
            values[f.name] = tuple(from_pb(w, m.WorkerStatus) for w in message.workers)
        elif f.name == "addresses":
            values[f.name] = dict(message.addresses)
        elif f.name == "relayed_weights":
            weights = tuple(message.relayed_weights)
            if not all(math.isfinite(w) and w > 0 for w in weights):
                raise WireError(f"{where} must be finite and positive, got {list(weights)}")
            values[f.name] = weights
        else:
            values[f.name] = _bounded(getattr(message, f.name), where)
    if cls in (m.PushHeader, m.PeerHeader) and not (math.isfinite(values["weight"]) and values["weight"] > 0):
        raise WireError(f"{name}.weight must be finite and positive, got {values['weight']}")
    result: m.Message = cls(**values)
    return result


def _bounded(value: Any, where: str) -> Any:
    """A scalar field's value, refused when a number is out of range or a string too long (the run config
    excepted: it is long by nature, and only the coordinator sends it)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and not -1 <= value <= MAX_WIRE_INT:
        raise WireError(f"{where} = {value} is out of range [-1, {MAX_WIRE_INT}]")
    if isinstance(value, str) and len(value) > MAX_WIRE_STRING and not where.endswith(".config_yaml"):
        raise WireError(f"{where} is {len(value)} characters long, over the limit of {MAX_WIRE_STRING}")
    return value


def _check_header_totals(kind: str, declared: tuple[int, int], entries: Mapping[str, Payload]) -> None:
    actual = (len(entries), sum(p.nbytes() for p in entries.values()))
    if declared != actual:
        raise WireError(f"{kind} declares (num_entries, total_bytes) = {declared}, but the entries have {actual}")


def _stream(
    wrapper: Any, header: PushHeader | StateHeader | m.AggregateHeader | m.PeerHeader, entries: Mapping[str, Payload],
    chunk_bytes: int, groups: Sequence[Mapping[str, Payload]] | None = None,
) -> Iterator[Any]:  # fmt: skip
    """`wrapper(header=...)` first, then every chunk of every entry, consecutive small ones together
    (`_chunk_messages`); `groups` (the entries, split) batches each group apart."""
    _check_header_totals(type(header).__name__, (header.num_entries, header.total_bytes), entries)
    yield wrapper(header=to_pb(header))
    for group in groups if groups is not None else [entries]:
        yield from _chunk_messages(wrapper, group, chunk_bytes)


def _chunk_messages(wrapper: Any, entries: Mapping[str, Payload], chunk_bytes: int) -> Iterator[Any]:
    """The entries' chunks as `wrapper(chunk=...)`, or `wrapper(chunks=...)` for consecutive ones that fit in one
    message (`batch_chunks`, up to BATCH_BYTES)."""
    for batch in batch_chunks(encode_entries(entries, chunk_bytes), min(chunk_bytes, BATCH_BYTES)):
        yield wrapper(chunk=batch[0]) if len(batch) == 1 else wrapper(chunks=pb.TensorChunks(chunks=batch))


def push_stream(
    header: PushHeader, entries: Mapping[str, Payload], chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> Iterator[pb.PushMessage]:
    """The PushUpdate request stream: the header, then every entry's chunks."""
    return _stream(pb.PushMessage, header, entries, chunk_bytes)


def pull_stream(
    header: StateHeader, entries: Mapping[str, Payload], chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> Iterator[pb.StateChunk]:
    """The PullState response stream: the header, then every entry's chunks."""
    return _stream(pb.StateChunk, header, entries, chunk_bytes)


def aggregate_entries(aggregate: Aggregate, omit: int | None = None) -> tuple[dict[str, Payload], tuple[float, ...]]:
    """An aggregate's entries as they travel: by tensor name, or "<k>/<tensor>" for relayed sender k
    (sender `omit` left out: the requester's own update, which it holds)."""
    if not aggregate.relayed:
        return dict(aggregate.payloads), ()
    entries = {f"{k}/{name}": p for k, update in enumerate(aggregate.relayed) if k != omit
               for name, p in update.payloads.items()}
    return entries, tuple(update.weight for update in aggregate.relayed)


def _sender_groups(entries: Mapping[str, Payload], relayed: bool) -> list[dict[str, Payload]]:
    """A relayed aggregate's entries split by sender ("<k>/..."), so that the chunks batched into one message
    never mix two senders: a pull that leaves one out drops whole messages. Else all of them, as one group."""
    if not relayed:
        return [dict(entries)]
    groups: dict[str, dict[str, Payload]] = {}
    for name, payload in entries.items():
        groups.setdefault(name.partition("/")[0], {})[name] = payload
    return list(groups.values())


@dataclasses.dataclass(frozen=True)
class EncodedAggregate:
    """An aggregate's PullAggregate stream encoded and serialized once (`of`), for every pull of it to share: per
    group of entries (`_sender_groups`: one per relayed sender, keyed by its index, or one keyed None) its entry
    count, its bytes and its chunk messages, serialized. `stream` gives exactly the bytes of the messages
    `aggregate_stream` would for the same header, without encoding or serializing anything again but the header:
    the coordinator's server sends bytes as they are (`protocols.wire.servicing.serialized_as_is`). Serializing
    per pull cost every pull a fresh copy of the aggregate, paged in and unmapped again (BENCHMARKS.md, "One
    pull's CPU"). Bytes never change, so any number of pulls may send them at once."""

    round: int
    weights: tuple[float, ...]
    groups: dict[int | None, tuple[int, int, tuple[bytes, ...]]]

    @classmethod
    def of(cls, aggregate: Aggregate, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> EncodedAggregate:
        entries, weights = aggregate_entries(aggregate)
        groups: dict[int | None, tuple[int, int, tuple[bytes, ...]]] = {}
        for group in _sender_groups(entries, bool(weights)):
            key = int(next(iter(group)).partition("/")[0]) if weights else None
            groups[key] = (len(group), sum(p.nbytes() for p in group.values()),
                           tuple(msg.SerializeToString() for msg in _chunk_messages(pb.AggregateChunk, group,
                                                                                    chunk_bytes)))
        return cls(aggregate.round, weights, groups)

    def header(self, state_hash: str, omit: int | None = None) -> m.AggregateHeader:
        """The stream's header for a requester whose own relayed update (slot `omit`) is left out."""
        kept = self._kept(omit)
        return m.AggregateHeader(round=self.round, num_entries=sum(n for n, _, _ in kept),
                                 total_bytes=sum(b for _, b, _ in kept), state_hash=state_hash,
                                 relayed_weights=self.weights,
                                 own_slot=0 if omit is None or not self.weights else omit + 1)

    def stream(self, state_hash: str, omit: int | None = None) -> Iterator[bytes]:
        """The serialized PullAggregate messages for this requester: its header, then the chunks it lacks."""
        yield pb.AggregateChunk(header=to_pb(self.header(state_hash, omit))).SerializeToString()
        for _, _, messages in self._kept(omit):
            yield from messages

    def _kept(self, omit: int | None) -> list[tuple[int, int, tuple[bytes, ...]]]:
        if omit is None or not self.weights:
            return list(self.groups.values())
        return [group for key, group in self.groups.items() if key != omit]


def aggregate_from_entries(
    round_: int, entries: Mapping[str, Payload], weights: tuple[float, ...], own: tuple[int, Update] | None = None
) -> Aggregate:
    """Inverse of `aggregate_entries`, with `own` = (slot, update) put back where the stream left it out;
    WireError for a relayed entry that names no sender, or a sender left without tensors."""
    if not weights:
        return Aggregate(round_, dict(entries))
    relayed: list[dict[str, Payload]] = [{} for _ in weights]
    for key, payload in entries.items():
        sender, sep, name = key.partition("/")
        # Canonical indices only ("00/w" would silently overwrite "0/w").
        if not (sep and sender.isdigit() and str(int(sender)) == sender and int(sender) < len(weights) and name):
            raise WireError(
                f"relayed aggregate entry {key!r} is not '<sender index>/<tensor>' for {len(weights)} senders"
            )
        relayed[int(sender)][name] = payload
    updates = [Update(p, w) for p, w in zip(relayed, weights, strict=True)]
    if own is not None:
        slot, update = own
        if not 0 <= slot < len(updates) or relayed[slot]:
            raise WireError(f"the aggregate leaves out slot {slot} for the requester, but it is not an empty slot")
        updates[slot] = update
    empty = [k for k, update in enumerate(updates) if not update.payloads]
    if empty:
        raise WireError(f"relayed sender(s) {empty} of the aggregate carry no tensors")
    return Aggregate(round_, relayed=tuple(updates))


def aggregate_stream(
    header: m.AggregateHeader, entries: Mapping[str, Payload], chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> Iterator[pb.AggregateChunk]:
    """The PullAggregate response stream: the header, then every entry's chunks (a relayed sender's batched
    apart from the others', as `EncodedAggregate` sends them)."""
    return _stream(pb.AggregateChunk, header, entries, chunk_bytes,
                   _sender_groups(entries, bool(header.relayed_weights)))


def read_aggregate(
    messages: Iterable[pb.AggregateChunk], max_total_bytes: int, own_update: Update | None = None
) -> tuple[m.AggregateHeader, Aggregate]:
    """Receive a PullAggregate stream: the header and the aggregate (with `own_update` put back in the slot
    the header names), or WireError naming the problem."""
    header, entries = _read_stream(messages, m.AggregateHeader, max_total_bytes)
    own = None
    if header.own_slot:
        if own_update is None:
            raise WireError("the aggregate leaves out the requester's own update, and none was given")
        own = (header.own_slot - 1, own_update)
    return header, aggregate_from_entries(header.round, entries, header.relayed_weights, own)


def _read_stream(
    messages: Iterable[Any], header_cls: type[Msg], max_total_bytes: int, on_header: Callable[[Msg], None] | None = None
) -> tuple[Msg, dict[str, Payload]]:
    stream = header_cls.__name__
    it = iter(messages)
    first = next(it, None)
    if first is None or first.WhichOneof("body") != "header":
        got = "nothing" if first is None else f"a {first.WhichOneof('body') or 'empty'} message"
        raise WireError(f"a stream must start with a {stream}, got {got}")
    header = from_pb(first.header, header_cls)
    num_entries: int = getattr(header, "num_entries")  # noqa: B009 - both header types have it
    total_bytes: int = getattr(header, "total_bytes")  # noqa: B009
    if total_bytes > max_total_bytes:
        raise WireTooLarge(f"{stream} declares {total_bytes} bytes, over the limit of {max_total_bytes}")
    if num_entries > MAX_ENTRIES:
        raise WireTooLarge(f"{stream} declares {num_entries} entries, over the limit of {MAX_ENTRIES}")
    if on_header is not None:
        on_header(header)  # may refuse the stream before any payload is buffered
    assembler = EntryAssembler(num_entries, max_total_bytes=total_bytes)
    for message in it:
        body = message.WhichOneof("body")
        if body == "chunk":
            assembler.feed(message.chunk)
        elif body == "chunks" and message.chunks.chunks:
            for chunk in message.chunks.chunks:
                assembler.feed(chunk)
        elif body == "chunks":
            raise WireError(f"after the {stream}, a chunks message carries no chunk")
        else:
            raise WireError(f"after the {stream}, every message must be a chunk; got {body or 'an empty one'}")
    entries = assembler.finish()
    if assembler.received_bytes != total_bytes:
        raise WireError(f"{stream} declares {total_bytes} bytes, the stream carried {assembler.received_bytes}")
    return header, entries


def read_push(
    messages: Iterable[pb.PushMessage], max_total_bytes: int, on_header: Callable[[PushHeader], None] | None = None
) -> tuple[PushHeader, dict[str, Payload]]:
    """Receive a PushUpdate stream: the validated header and the payloads, or WireError naming the problem.
    `on_header` sees the header before any chunk is read, and may refuse the push by raising."""
    return _read_stream(messages, PushHeader, max_total_bytes, on_header)


def read_pull(
    messages: Iterable[pb.StateChunk], max_total_bytes: int, verify_hash: bool = True
) -> tuple[StateHeader, dict[str, Payload]]:
    """Receive a PullState stream; with `verify_hash`, check the dense state against the header's hash."""
    header, entries = _read_stream(messages, StateHeader, max_total_bytes)
    if verify_hash:
        try:
            params = {name: dense_values(payload) for name, payload in entries.items()}
        except PayloadError as exc:
            raise WireError(f"pulled state is not all dense payloads: {exc}") from exc
        got = state_hash(params)
        if got != header.state_hash:
            raise WireError(f"pulled state hashes to {got}, the header says {header.state_hash}")
    return header, entries


def peer_stream(
    header: m.PeerHeader, entries: Mapping[str, Payload], chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> Iterator[pb.PeerChunk]:
    """The Gossip request stream: the header, then every entry's chunks."""
    return _stream(pb.PeerChunk, header, entries, chunk_bytes)


def read_peer(
    messages: Iterable[pb.PeerChunk], max_total_bytes: int, on_header: Callable[[m.PeerHeader], None] | None = None
) -> tuple[m.PeerHeader, dict[str, Payload]]:
    """Receive a Gossip stream: the validated header and the payloads, or WireError naming the problem.
    `on_header` sees the header before any chunk is read, and may refuse the message by raising."""
    return _read_stream(messages, m.PeerHeader, max_total_bytes, on_header)


def state_hash(params: Mapping[str, torch.Tensor]) -> str:
    """The replica digest (`protocols.replica.digest`) of a flat tensor dict."""
    return digest(dict(params))


# ---- one update as one byte string ---------------------------------------------------------------
# Layout (little-endian): magic "LBUPD" + format version byte | crc32 of everything after it (u32) |
# num_entries (u64) | total_bytes (u64, the component bytes, as in PushHeader) | weight (f64) |
# then the entries as `TensorChunk` messages (the same chunk encoding as the gRPC streams), each framed
# by its serialized length (u32). The checksum makes any flipped bit a WireError rather than a silently
# wrong update: the buffers are exchanged by collectives that, unlike gRPC, carry no framing of their own.
_UPDATE_MAGIC = b"LBUPD\x01"
_UPDATE_PREFIX = struct.Struct("<6sI")
_UPDATE_FIELDS = struct.Struct("<QQd")
_FRAME_LENGTH = struct.Struct("<I")


def update_to_bytes(entries: Mapping[str, Payload], weight: float = 1.0) -> bytes:
    """One update (its payloads and its weight in the average) as one self-checking byte string."""
    if not (math.isfinite(weight) and weight > 0):
        raise WireError(f"update weight must be finite and positive, got {weight}")
    total = sum(p.nbytes() for p in entries.values())
    parts = [_UPDATE_FIELDS.pack(len(entries), total, weight)]
    for chunk in encode_entries(entries, MAX_CHUNK_BYTES):
        message = chunk.SerializeToString()
        parts.extend((_FRAME_LENGTH.pack(len(message)), message))
    body = b"".join(parts)
    return _UPDATE_PREFIX.pack(_UPDATE_MAGIC, zlib.crc32(body)) + body


def update_from_bytes(data: bytes | bytearray | memoryview, max_total_bytes: int) -> tuple[dict[str, Payload], float]:
    """The payloads and weight of `update_to_bytes` output, or WireError naming what was wrong.

    `max_total_bytes` bounds the component bytes the update may declare (checked before allocating).
    """
    view = memoryview(data).cast("B")
    header_size = _UPDATE_PREFIX.size + _UPDATE_FIELDS.size
    if len(view) < header_size:
        raise WireError(f"update bytes are {len(view)} long, shorter than the {header_size}-byte header")
    magic, crc = _UPDATE_PREFIX.unpack_from(view)
    if magic != _UPDATE_MAGIC:
        raise WireError(
            f"update bytes start with {magic!r}, expected {_UPDATE_MAGIC!r} (not an update, or another version)"
        )
    body = view[_UPDATE_PREFIX.size :]
    if zlib.crc32(body) != crc:
        raise WireError("update bytes fail their crc32 check: corrupted or truncated")
    num_entries, total_bytes, weight = _UPDATE_FIELDS.unpack_from(body)
    if not (math.isfinite(weight) and weight > 0):
        raise WireError(f"update weight must be finite and positive, got {weight}")
    if total_bytes > max_total_bytes:
        raise WireTooLarge(f"update declares {total_bytes} bytes, over the limit of {max_total_bytes}")
    if num_entries > MAX_ENTRIES:
        raise WireTooLarge(f"update declares {num_entries} entries, over the limit of {MAX_ENTRIES}")
    assembler = EntryAssembler(num_entries, max_total_bytes=total_bytes)
    pos = _UPDATE_FIELDS.size
    while pos < len(body):
        if pos + _FRAME_LENGTH.size > len(body):
            raise WireError(f"update bytes end inside a chunk's length prefix at byte {pos}")
        (length,) = _FRAME_LENGTH.unpack_from(body, pos)
        pos += _FRAME_LENGTH.size
        if pos + length > len(body):
            raise WireError(f"a chunk declares {length} bytes at byte {pos}, but only {len(body) - pos} remain")
        try:
            chunk = pb.TensorChunk.FromString(bytes(body[pos : pos + length]))
        except DecodeError as exc:
            raise WireError(f"chunk at byte {pos} of the update is not a TensorChunk: {exc}") from exc
        assembler.feed(chunk)
        pos += length
    entries = assembler.finish()
    if assembler.received_bytes != total_bytes:
        raise WireError(f"update declares {total_bytes} bytes, its chunks carried {assembler.received_bytes}")
    return entries, weight
