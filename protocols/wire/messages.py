"""The wire messages as plain frozen dataclasses: what the coordinator and the worker actually handle.

They mirror `lowband.proto` (package `lowband.v1`) field for field, minus the tensor chunks, which the
stream helpers of `serde.py` turn into `compression.payload.Payload`s. Nothing here imports the
generated `_pb2` modules; `serde.to_pb` / `serde.from_pb` convert in both directions and validate.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

# Largest single gRPC message either end accepts. Tensor chunks are at most 4 MiB, so 16 MiB leaves room
# for the entry spec riding on a first chunk and for a long run config in JoinReply.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
# Pass as `options=` to grpc.server(...) and grpc.insecure_channel / secure_channel(...): gRPC's default
# limit is 4 MiB for receiving, which a 4 MiB chunk plus its header would exceed.
GRPC_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]
# Tensor chunk data size: 1 MiB by default; runs should stay within 1-4 MiB, which keeps per-message
# overhead small and latency bounded. The encoder accepts anything from 1 byte (tests use tiny chunks)
# up to MAX_CHUNK_BYTES, which MAX_MESSAGE_BYTES is sized for.
DEFAULT_CHUNK_BYTES = 1 << 20
MAX_CHUNK_BYTES = 4 << 20


class WireError(ValueError):
    """A wire message is malformed or inconsistent; the message names the field and what was wrong.

    Whoever raised it applied nothing from the message.
    """


class Phase(enum.Enum):
    """Run phase reported by the coordinator."""

    WAITING_FOR_WORKERS = "waiting_for_workers"
    TRAINING = "training"
    FINISHED = "finished"


class PushKind(enum.Enum):
    """What a push carries: a round's update, or the worker's initial parameters."""

    UPDATE = "update"
    INITIAL_STATE = "initial_state"


@dataclass(frozen=True)
class Envelope:
    """Identity and context of every request (see `Envelope` in lowband.proto)."""

    run_id: str
    worker_id: str
    round: int
    protocol_version: int
    token: str = ""


@dataclass(frozen=True)
class JoinRequest:
    """A worker asks to join; `envelope.worker_id` is the requested id (empty: coordinator picks)."""

    envelope: Envelope
    hostname: str = ""


@dataclass(frozen=True)
class JoinReply:
    worker_id: str
    worker_index: int  # 0-based join order, e.g. which data shard the worker trains on
    run_id: str
    round: int
    config_yaml: str
    has_global_state: bool
    heartbeat_interval_s: float


@dataclass(frozen=True)
class HeartbeatRequest:
    envelope: Envelope
    inner_step: int = 0
    last_loss: float = float("nan")  # NaN until the first inner step
    bytes_sent: int = 0
    eval_loss: float = float("nan")  # NaN until the worker has evaluated


@dataclass(frozen=True)
class HeartbeatReply:
    round: int
    phase: Phase


@dataclass(frozen=True)
class LeaveRequest:
    envelope: Envelope
    reason: str = ""


@dataclass(frozen=True)
class LeaveReply:
    """Acknowledgement of a Leave; the OK status is the whole answer."""


@dataclass(frozen=True)
class AttestRequest:
    """A worker's digest of its frozen base weights (adapters only train); see `AttestBase` in the .proto."""

    envelope: Envelope
    base_digest: str = ""


@dataclass(frozen=True)
class AttestReply:
    run_base_digest: str = ""


@dataclass(frozen=True)
class PullRequest:
    envelope: Envelope
    resync: bool = False  # the worker's replica fell behind or differed (false: joining)


@dataclass(frozen=True)
class StateHeader:
    """First message of a PullState stream."""

    round: int
    num_entries: int
    total_bytes: int
    state_hash: str


@dataclass(frozen=True)
class AggregateRequest:
    """Ask for the aggregate that closed `round` (the worker's replica is at that round)."""

    envelope: Envelope
    round: int


@dataclass(frozen=True)
class AggregateHeader:
    """First message of a PullAggregate stream. Empty `relayed_weights`: the entries are the aggregate
    update by tensor name; else the senders' updates in fold order, entry "<k>/<tensor>" from sender k,
    except the requester's own (slot `own_slot - 1`), which it already holds."""

    round: int
    num_entries: int
    total_bytes: int
    state_hash: str
    relayed_weights: tuple[float, ...] = ()
    # Relayed only: 1 + the index of the requester's own update, left out of the stream (0: none left out).
    own_slot: int = 0


@dataclass(frozen=True)
class PushHeader:
    """First message of a PushUpdate stream."""

    envelope: Envelope
    kind: PushKind
    weight: float
    num_entries: int
    total_bytes: int
    train_loss: float = float("nan")
    tokens: int = 0
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class PushReply:
    accepted: bool
    round: int
    bytes_received: int


@dataclass(frozen=True)
class WaitRequest:
    """Wait until the coordinator's round exceeds `after_round` (0 wait = the server's default)."""

    envelope: Envelope
    after_round: int
    max_wait_s: float = 0.0


@dataclass(frozen=True)
class RoundInfo:
    round: int
    phase: Phase
    state_hash: str
    rounds_total: int
    target_round_s: float = 0.0


# ---- gossip: the Rendezvous and Peer services -----------------------------------------------------


@dataclass(frozen=True)
class EnrollRequest:
    """A gossip worker asks to join, giving the address its Peer service listens on."""

    envelope: Envelope
    hostname: str = ""
    address: str = ""  # HOST:PORT of the worker's Peer service


@dataclass(frozen=True)
class EnrollReply:
    worker_id: str
    worker_index: int  # the worker's node index in the gossip graph, and its data shard
    run_id: str
    config_yaml: str
    heartbeat_interval_s: float


@dataclass(frozen=True)
class RosterRequest:
    """The sender reached `envelope.round`; who is in the run for it."""

    envelope: Envelope


@dataclass(frozen=True)
class RosterReply:
    round: int
    workers: int
    finished: bool
    addresses: dict[int, str] = field(default_factory=dict)  # node index -> Peer service HOST:PORT


@dataclass(frozen=True)
class ReportRequest:
    """One worker's metrics for round `envelope.round`."""

    envelope: Envelope
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ReportReply:
    """Acknowledgement of a Report; the OK status is the whole answer."""


@dataclass(frozen=True)
class PeerHeader:
    """First message of a Gossip stream: node `sender`'s message for gossip step `step`."""

    envelope: Envelope
    step: int
    sender: int
    weight: float
    num_entries: int
    total_bytes: int


@dataclass(frozen=True)
class PeerAck:
    step: int
    bytes_received: int


# Every message dataclass that `serde.to_pb` / `serde.from_pb` convert.
Message = (
    Envelope
    | JoinRequest
    | JoinReply
    | HeartbeatRequest
    | HeartbeatReply
    | LeaveRequest
    | LeaveReply
    | AttestRequest
    | AttestReply
    | PullRequest
    | StateHeader
    | AggregateRequest
    | AggregateHeader
    | PushHeader
    | PushReply
    | WaitRequest
    | RoundInfo
    | EnrollRequest
    | EnrollReply
    | RosterRequest
    | RosterReply
    | ReportRequest
    | ReportReply
    | PeerHeader
    | PeerAck
)
