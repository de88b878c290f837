"""The worker's side of the gRPC star: every call to the coordinator, with reconnect and backoff.

Transient failures (coordinator restarting, network blips: UNAVAILABLE, DEADLINE_EXCEEDED; a busy
coordinator: RESOURCE_EXHAUSTED saying so) are retried
with exponential backoff up to `retry_for_s`; a coordinator that forgot us (NOT_FOUND after it restarted;
UNAUTHENTICATED for the session: it was resumed from a checkpoint older than our join) gets one re-join under
the same id. Other refusals (bad shape, stale round, a bad run token) are never retried.

The run's token (`token`: the run's secret or this worker's own) goes on the wire only in Join; every later
call carries the session credential that join returned (`session`; coordinator/sessions.py).
Bytes are counted as serialized messages, i.e. what really crossed the wire, split by kind (`Traffic`):
updates and aggregates are protocol bytes, the initial state and whole-replica pulls state bytes, every other
call (and the small requests and replies around the streams) control bytes.

A coordinator restarted with `--resume` continues from its last checkpoint: an update it acknowledged
after that checkpoint is gone with the process. So after a failure that could hide a restart (unreachable or
too slow: `reconnects` counts them) the update this worker is waiting on is pushed again before the wait goes
on; push is idempotent per (worker, round), so a coordinator that still has it acknowledges it without folding it
twice. A busy refusal, or a call dropped in the server's queue, is retried (`retries` counts every retry) without
that: the coordinator that refused it is the one that holds the update.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import grpc

from compression.payload import dense, dense_values
from protocols.base import Aggregate, Update
from protocols.config import PROTOCOL_VERSION
from protocols.handshake import LOWBAND_VERSION
from protocols.replica import Params, Replica
from protocols.wire import lowband_pb2_grpc, serde
from protocols.wire import messages as m
from worker.backoff import Backoff
from worker.traffic import Traffic

log = logging.getLogger(__name__)
T = TypeVar("T")
_TRANSIENT = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
# One heartbeat call's limit; closing a transport waits this and a little more for a beat in flight to end.
HEARTBEAT_TIMEOUT_S = 10.0
BEAT_JOIN_S = HEARTBEAT_TIMEOUT_S + 2.0
# One ReservePush long poll: the coordinator answers "not yet" after at most this, and the worker asks again.
RESERVE_WAIT_S = 30.0
# gRPC's details for a call this process ended itself (its channel closed, the call cancelled). Any other
# CANCELLED came from the server's side, such as gRPC core dropping a call that waited too long to be taken
# (protocols/wire/servicing.py PENDING_CALL_WAIT_S): nothing of it was applied, so it is retried.
_OWN_CANCELS = ("Channel closed!", "Locally cancelled by application!")


def transient(err: grpc.RpcError) -> bool:
    """Worth retrying: the coordinator unreachable or slow, busy (RESOURCE_EXHAUSTED for want of a free slot,
    not for a request too big), or the call dropped on the server's side before it was served."""
    code, details = err.code(), err.details() or ""
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
        return details.startswith(m.BUSY_PREFIXES)
    if code is grpc.StatusCode.CANCELLED:
        return details not in _OWN_CANCELS
    return code in _TRANSIENT


class StaleRound(Exception):
    """The round this update was for has already closed (we were too slow); nothing was applied."""


class EarlyRound(Exception):
    """The round this update is for is not open yet (we ran ahead, overlapping); nothing was applied."""


class CoordinatorClient:
    def __init__(
        self,
        address: str,
        token: str = "",
        tls_ca: bytes | None = None,
        chunk_bytes: int = m.DEFAULT_CHUNK_BYTES,
        retry_for_s: float = 60.0,
        tls_client: tuple[bytes, bytes] | None = None,
    ) -> None:
        # tls_client: (certificate chain, private key) this worker shows a coordinator that requires client
        # certificates (mutual TLS); only with tls_ca.
        self.address, self.token, self.tls_ca, self.tls_client = address, token, tls_ca, tls_client
        self.session = ""  # the credential of this member's latest join: every call after Join carries it
        self._joining = threading.Lock()  # the heartbeat thread and the round loop may both find a re-join due
        self.chunk_bytes, self.retry_for_s = chunk_bytes, retry_for_s
        self.run_id, self.worker_id, self.round = "", "", 0
        self.hostname = ""
        self.traffic = Traffic()
        self.last_state_hash = ""
        self.config_hash = ""  # the run's, from the first join (protocols/handshake.py)
        self.retries = 0  # transient failures retried
        self.reconnects = 0  # of those, the coordinator unreachable or too slow (a restart shows up as some)
        # The last update pushed: (round, its push arguments, `reconnects` when it was last acknowledged).
        self._pending: tuple[int, tuple[Any, ...], int] | None = None
        # Calls in progress that the coordinator counts as proof of life while they last (its `attend`): long
        # polls, pulls and pushes. While one is open a periodic heartbeat with nothing new to say is skipped.
        self._open_calls = 0
        self._open_lock = threading.Lock()
        self._said: tuple[int, float | None] | None = None  # (step, loss) of the last periodic beat sent
        self._connect()

    def _connect(self) -> None:
        if self.tls_ca is not None:
            cert, key = self.tls_client or (None, None)
            creds = grpc.ssl_channel_credentials(root_certificates=self.tls_ca, private_key=key, certificate_chain=cert)
            self.channel = grpc.secure_channel(self.address, creds, options=m.GRPC_OPTIONS)
        else:
            self.channel = grpc.insecure_channel(self.address, options=m.GRPC_OPTIONS)
        self.stub = lowband_pb2_grpc.CoordinatorStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    @property
    def attended(self) -> bool:
        """Whether a call the coordinator counts as proof of life is in progress."""
        return self._open_calls > 0

    @contextlib.contextmanager
    def _attending(self) -> Iterator[None]:
        with self._open_lock:
            self._open_calls += 1
        try:
            yield
        finally:
            with self._open_lock:
                self._open_calls -= 1

    @property
    def bytes_sent(self) -> int:
        return self.traffic.sent

    @property
    def bytes_received(self) -> int:
        return self.traffic.received

    def _envelope(self, round_: int | None = None) -> m.Envelope:
        """A call's envelope, with this member's session (build it inside the call: a re-join changes it)."""
        r = self.round if round_ is None else round_
        return m.Envelope(self.run_id, self.worker_id, r, PROTOCOL_VERSION, self.session)

    def _call(self, fn: Callable[[], T], rejoin: bool = True, retry: bool = True) -> T:
        """`fn`, re-joining once if the coordinator forgot this member, and (with `retry`) tried again with backoff
        after a transient failure for up to `retry_for_s`."""
        backoff, deadline = Backoff(), time.monotonic() + (self.retry_for_s if retry else 0.0)
        while True:
            session = self.session
            try:
                return fn()
            except grpc.RpcError as err:
                code = err.code()
                forgot = code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAUTHENTICATED)
                if forgot and rejoin and self.worker_id and self.session:
                    with self._joining:
                        if self.session == session:  # else another call re-joined meanwhile: use its session
                            log.warning("coordinator does not know %s (%s); re-joining", self.worker_id, code.name)
                            self._join_once()
                    rejoin = False
                    continue
                if not transient(err) or time.monotonic() > deadline:
                    raise
                self.retries += 1
                if code in _TRANSIENT:
                    self.reconnects += 1
                log.info("coordinator unreachable or busy (%s); retrying in about %.1fs", code.name, backoff.delay)
                backoff.wait()

    def _unary(self, method: Callable[..., Any], msg: Any, timeout: float = 60.0) -> Any:
        pb = serde.to_pb(msg)
        self.traffic.add("control", sent=pb.ByteSize())
        reply = method(pb, timeout=timeout)
        self.traffic.add("control", received=reply.ByteSize())
        return serde.from_pb(reply)

    # ---- calls ---------------------------------------------------------------------------------
    def _join_once(self) -> m.JoinReply:
        # A re-join sends the hash of the config this worker took at its first join: a coordinator resumed with
        # another config refuses it instead of letting it train the old one.
        env = m.Envelope(self.run_id, self.worker_id, 0, PROTOCOL_VERSION, self.token)  # the handshake: the secret
        req = m.JoinRequest(envelope=env, hostname=self.hostname, software_version=LOWBAND_VERSION,
                            config_hash=self.config_hash)
        reply = self._unary(self.stub.Join, req)
        assert isinstance(reply, m.JoinReply)
        self.run_id, self.worker_id, self.round = reply.run_id, reply.worker_id, reply.round
        self.session = reply.session_token
        self.config_hash = reply.config_hash
        return reply

    def join(self, hostname: str, requested_id: str = "") -> m.JoinReply:
        self.hostname, self.worker_id = hostname, requested_id
        return self._call(self._join_once, rejoin=False)

    def heartbeat(self, step: int, loss: float | None, eval_loss: float | None, retry: bool = True) -> m.HeartbeatReply:
        """Liveness and progress. A periodic beat passes `retry=False`: the next beat is its retry, and a thread
        left retrying could still be inside a call when its process exits."""
        def known(value: float | None) -> float:  # NaN = no loss: a diverged (inf) loss is not a reading
            return value if value is not None and math.isfinite(value) else float("nan")

        def req() -> m.HeartbeatRequest:
            return m.HeartbeatRequest(envelope=self._envelope(), inner_step=step, last_loss=known(loss),
                                      bytes_sent=self.bytes_sent, eval_loss=known(eval_loss))

        reply = self._call(lambda: self._unary(self.stub.Heartbeat, req(), timeout=HEARTBEAT_TIMEOUT_S), retry=retry)
        assert isinstance(reply, m.HeartbeatReply)
        return reply

    def beat(self, step: int, loss: float | None, retry: bool = False) -> bool:
        """A periodic heartbeat, skipped while a call the coordinator counts as proof of life is open and `step`
        and `loss` are as the last beat said; True when it was sent. Periodic beats do not retry by default:
        the next beat is their retry (`heartbeat`)."""
        news = (step, loss)
        if news == self._said and self.attended:  # the open call speaks for this worker
            return False
        self.heartbeat(step, loss, None, retry=retry)
        self._said = news
        return True

    def attest_base(self, digest: str) -> str:
        """State the digest of this worker's frozen base weights; the run's digest (a mismatch is refused)."""
        reply = self._call(lambda: self._unary(
            self.stub.AttestBase, m.AttestRequest(envelope=self._envelope(), base_digest=digest), timeout=30.0))
        assert isinstance(reply, m.AttestReply)
        return reply.run_base_digest

    def leave(self, reason: str = "done") -> None:
        self._unary(self.stub.Leave, m.LeaveRequest(envelope=self._envelope(), reason=reason), timeout=10.0)

    def wait_round(self, after_round: int, max_wait_s: float = 30.0) -> m.RoundInfo:
        def once() -> Any:
            wait = max_wait_s if self._repush_if_reconnected(after_round) else min(max_wait_s, 1.0)
            req = m.WaitRequest(envelope=self._envelope(), after_round=after_round, max_wait_s=wait)
            with self._attending():
                return self._unary(self.stub.WaitRound, req, timeout=wait + 30.0)

        info = self._call(once)
        assert isinstance(info, m.RoundInfo)
        return info

    def _repush_if_reconnected(self, round_: int) -> bool:
        """Push the update of `round_` again if the connection failed since it was acknowledged (the
        coordinator may have restarted from a checkpoint without it). False while the coordinator cannot
        take it yet (a resumed coordinator waiting for its workers): the caller then polls briefly."""
        pending = self._pending
        if pending is None or pending[0] != round_ or pending[2] == self.reconnects:
            return True
        seen = self.reconnects
        try:
            self._push(*pending[1])
        except grpc.RpcError as err:
            details = err.details() or ""
            if err.code() is grpc.StatusCode.FAILED_PRECONDITION and details.startswith("early round"):
                return False
            if not (err.code() is grpc.StatusCode.FAILED_PRECONDITION and details.startswith("stale round")):
                raise
        log.info("pushed round %d's update again after reconnecting", round_)
        self._pending = (pending[0], pending[1], seen)
        return True

    def pull(self, resync: bool = False) -> Replica:
        """The coordinator's whole replica, checked against its digest (`resync`: ours fell behind or differed)."""

        def once() -> Replica:
            req = serde.to_pb(m.PullRequest(envelope=self._envelope(), resync=resync))
            self.traffic.add("control", sent=req.ByteSize())
            with self._attending():
                stream = self.stub.PullState(req, timeout=600.0)
                # read_pull recomputes the digest of what arrived and refuses a mismatch.
                header, entries = serde.read_pull(self._count_in(stream, "state"), max_total_bytes=1 << 40)
            replica = Replica.from_tensors({name: dense_values(p) for name, p in entries.items()})
            self.round, self.last_state_hash = header.round, header.state_hash
            return replica

        return self._call(once)

    def pull_aggregate(self, round_: int, own_update: Update | None = None) -> tuple[m.AggregateHeader, Aggregate]:
        """The aggregate that closed `round_` and the digest of the coordinator's replica after it. A relayed
        aggregate leaves out this worker's own update (`own_update`, what it pushed), which is put back."""

        def once() -> tuple[m.AggregateHeader, Aggregate]:
            req = serde.to_pb(m.AggregateRequest(envelope=self._envelope(), round=round_))
            self.traffic.add("control", sent=req.ByteSize())
            with self._attending():
                stream = self.stub.PullAggregate(req, timeout=600.0)
                return serde.read_aggregate(self._count_in(stream, "protocol"), 1 << 40, own_update)

        return self._call(once)

    def offer_state(self, params: Params) -> bool:
        """Offer initial parameters; False when another worker's offer won (that is fine)."""
        entries = {name: dense(t) for name, t in params.items()}
        try:
            self._push(m.PushKind.INITIAL_STATE, 0, entries, weight=1.0, metrics={})
            return True
        except grpc.RpcError as err:
            if err.code() is grpc.StatusCode.ALREADY_EXISTS:
                return False
            raise

    def push(self, round_: int, update: Update, metrics: dict[str, float]) -> m.PushReply:
        args = (m.PushKind.UPDATE, round_, update.payloads, update.weight, metrics, update.base)
        seen = self.reconnects
        try:
            reply = self._push(*args)
            self._pending = (round_, args, seen)
            return reply
        except grpc.RpcError as err:
            details = err.details() or ""
            if err.code() is grpc.StatusCode.FAILED_PRECONDITION and details.startswith("stale round"):
                raise StaleRound(details) from None
            if err.code() is grpc.StatusCode.FAILED_PRECONDITION and details.startswith("early round"):
                raise EarlyRound(details) from None
            raise

    def _push(self, kind: m.PushKind, round_: int, entries: dict[str, Any], weight: float,
              metrics: dict[str, float], base: str = "") -> m.PushReply:
        def header() -> m.PushHeader:  # built per attempt: a re-join in between changes the session
            return m.PushHeader(envelope=self._envelope(round_), kind=kind, weight=weight, num_entries=len(entries),
                                total_bytes=sum(p.nbytes() for p in entries.values()),
                                train_loss=metrics.get("train_loss", float("nan")),
                                tokens=int(metrics.get("tokens", 0)), metrics=dict(metrics), base_state_hash=base)

        counted_as = "state" if kind is m.PushKind.INITIAL_STATE else "protocol"

        def once() -> m.PushReply:
            with self._attending():
                if kind is m.PushKind.UPDATE:
                    self._reserve(round_)
                stream = self._count_out(serde.push_stream(header(), entries, self.chunk_bytes), counted_as)
                pb_reply = self.stub.PushUpdate(stream, timeout=600.0)
            self.traffic.add("control", received=pb_reply.ByteSize())
            reply = serde.from_pb(pb_reply)
            assert isinstance(reply, m.PushReply)
            return reply

        return self._call(once)

    def _reserve(self, round_: int) -> None:
        """Wait until the coordinator keeps room for this worker's push (ReservePush), so that its payload is
        sent only once it will be read, not left waiting in the coordinator's buffers. Anything but a transient
        failure is left to the push itself, which refuses (or re-joins) as it always did."""
        while True:
            req = m.ReserveRequest(envelope=self._envelope(round_), max_wait_s=RESERVE_WAIT_S)
            try:
                reply = self._unary(self.stub.ReservePush, req, timeout=RESERVE_WAIT_S + 30.0)
            except grpc.RpcError as err:
                if transient(err):
                    raise  # the push's retry loop tries again
                return
            assert isinstance(reply, m.ReserveReply)
            if reply.reserved:
                return

    def _count_out(self, msgs: Iterable[Any], kind: str) -> Iterator[Any]:
        for msg in msgs:
            self.traffic.add(kind, sent=msg.ByteSize())
            yield msg

    def _count_in(self, msgs: Iterable[Any], kind: str) -> Iterator[Any]:
        for msg in msgs:
            self.traffic.add(kind, received=msg.ByteSize())
            yield msg
