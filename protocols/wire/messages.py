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


# Bounds on numbers and strings from the wire, checked by `serde.from_pb` before anything uses them: counts
# (rounds, steps, bytes, tokens) stay exact in a float64; strings other than the run config are short.
MAX_WIRE_INT = 1 << 53
MAX_WIRE_STRING = 4096
MAX_METRICS = 1024
# Bounds on what a tensor stream may declare (tensor_chunks.py): entries per stream, dimensions per shape
# and elements per tensor.
MAX_ENTRIES = 1 << 20
MAX_DIMS = 16
MAX_ELEMENTS = 1 << 40


# A RESOURCE_EXHAUSTED whose details start with one of these means the server is busy (all slots of a kind
# in use, gRPC's bound on calls in flight, or on calls waiting to be taken), not that the request was too big:
# clients retry it later.
BUSY_PREFIXES = ("server busy:", "Concurrent RPC limit exceeded", "Too many pending requests")


class WireError(ValueError):
    """A wire message is malformed or inconsistent; the message names the field and what was wrong.

    Whoever raised it applied nothing from the message.
    """


class WireTooLarge(WireError):
    """A message or stream is over a size limit (answered with RESOURCE_EXHAUSTED); nothing was buffered
    beyond the limit."""


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
    software_version: str = ""  # the worker's lowband version (protocols/handshake.py)
    config_hash: str = ""  # on a re-join: the hash of the config the worker trains with


@dataclass(frozen=True)
class JoinReply:
    worker_id: str
    worker_index: int  # 0-based join order, e.g. which data shard the worker trains on
    run_id: str
    round: int
    config_yaml: str
    has_global_state: bool
    heartbeat_interval_s: float
    config_hash: str = ""
    session_token: str = ""  # the credential every later call of this member carries (Envelope.token)


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
    base_state_hash: str = ""  # digest of the replica the update was computed against


@dataclass(frozen=True)
class PushReply:
    accepted: bool
    round: int
    bytes_received: int


@dataclass(frozen=True)
class ReserveRequest:
    """Room for this worker's next push, waiting up to `max_wait_s` (0 = the server's default)."""

    envelope: Envelope
    max_wait_s: float = 0.0


@dataclass(frozen=True)
class ReserveReply:
    reserved: bool
    hold_s: float


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
    # Elastic membership (coordinator/deal.py): the round the current shard deal took effect, and the
    # requester's shard in it (NOT_DEALT = -1: it joined mid-round and sits the round out) of `shard_count`.
    # All 0 with a fixed membership: a worker keeps the shard of its join index.
    membership_epoch: int = 0
    shard_index: int = 0
    shard_count: int = 0


@dataclass(frozen=True)
class StatusRequest:
    """An operator asks where the run stands (no worker: envelope.worker_id is empty)."""

    envelope: Envelope


@dataclass(frozen=True)
class WorkerStatus:
    """One worker as the coordinator sees it (see `WorkerStatus` in lowband.proto): bytes split into protocol,
    control and state traffic, "sent" meaning worker -> coordinator."""

    worker_id: str
    hostname: str = ""
    alive: bool = False
    round: int = 0
    inner_step: int = 0
    loss: float = float("nan")  # NaN: none yet
    eval_loss: float = float("nan")  # NaN: none yet
    tokens: int = 0
    tokens_per_s: float = float("nan")  # NaN: unknown
    link: str = ""  # empty: the worker reported no emulated link
    resyncs: int = 0
    last_seen_s: float = 0.0
    protocol_sent: int = 0
    protocol_received: int = 0
    control_sent: int = 0
    control_received: int = 0
    state_sent: int = 0
    state_received: int = 0


@dataclass(frozen=True)
class StatusReply:
    run_id: str
    name: str
    protocol: str
    phase: Phase
    round: int
    rounds_total: int
    workers: tuple[WorkerStatus, ...] = ()


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
    session_token: str = ""  # the credential every later rendezvous call of this worker carries (Envelope.token)
    peer_token: str = ""  # the run's peer secret: every Gossip message's Envelope.token ("" when the run has no token)


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
    | ReserveRequest
    | ReserveReply
    | WaitRequest
    | RoundInfo
    | StatusRequest
    | WorkerStatus
    | StatusReply
    | EnrollRequest
    | EnrollReply
    | RosterRequest
    | RosterReply
    | ReportRequest
    | ReportReply
    | PeerHeader
    | PeerAck
)
