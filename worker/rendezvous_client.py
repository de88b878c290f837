"""A gossip worker's calls to the coordinator's Rendezvous service: enroll, roster, report, heartbeat, leave.

The rendezvous only says who is in the run, where each peer listens and which round it is; the models go
worker to worker (worker/transports/p2p.py). Transient failures (UNAVAILABLE, DEADLINE_EXCEEDED: the
coordinator restarting, a network blip; RESOURCE_EXHAUSTED "server busy": its guards are full) are retried
with exponential backoff for up to `retry_for_s`; refusals (bad token, unknown worker, finished run) are not.
The run's token goes on the wire only in Enroll; every later call carries the session Enroll returned.
Bytes are counted as serialized messages, both ways, as `worker/client.py` counts them: what really crossed
the wire.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import grpc

from protocols.config import PROTOCOL_VERSION
from protocols.wire import lowband_pb2_grpc, serde
from protocols.wire import messages as m
from worker.backoff import Backoff
from worker.client import HEARTBEAT_TIMEOUT_S, transient

log = logging.getLogger(__name__)
T = TypeVar("T")
# The longest one Roster call may take: the rendezvous may hold it until the round's workers arrived.
ROSTER_TIMEOUT_S = 600.0


class RendezvousClient:
    def __init__(self, address: str, token: str = "", retry_for_s: float = 60.0) -> None:
        self.address, self.token, self.retry_for_s = address, token, retry_for_s
        self.session = ""  # from Enroll: every later call carries it instead of the run's token
        self.run_id, self.worker_id = "", ""
        self.bytes_sent = self.bytes_received = 0
        self._count = threading.Lock()  # the heartbeat thread and the round loop call concurrently
        self.channel = grpc.insecure_channel(address, options=m.GRPC_OPTIONS)
        self.stub = lowband_pb2_grpc.RendezvousStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def _envelope(self, round_: int = 0) -> m.Envelope:
        return m.Envelope(self.run_id, self.worker_id, round_, PROTOCOL_VERSION, self.session)

    def _call(self, fn: Callable[[], T], retry: bool = True) -> T:
        backoff, deadline = Backoff(), time.monotonic() + (self.retry_for_s if retry else 0.0)
        while True:
            try:
                return fn()
            except grpc.RpcError as err:
                if not transient(err) or time.monotonic() > deadline:
                    raise
                log.info("rendezvous unreachable (%s); retrying in about %.1fs", err.code().name, backoff.delay)
                backoff.wait()

    def _unary(self, method: Callable[..., Any], msg: m.Message, timeout: float = 60.0) -> m.Message:
        request = serde.to_pb(msg)
        with self._count:
            self.bytes_sent += request.ByteSize()
        reply = method(request, timeout=timeout)
        with self._count:
            self.bytes_received += reply.ByteSize()
        return serde.from_pb(reply)

    def enroll(self, hostname: str, address: str, requested_id: str = "") -> m.EnrollReply:
        """Join the run with the address this worker's Peer service listens on."""
        self.worker_id = requested_id
        env = m.Envelope(self.run_id, self.worker_id, 0, PROTOCOL_VERSION, self.token)  # the handshake: the secret
        request = m.EnrollRequest(envelope=env, hostname=hostname, address=address)
        reply = self._call(lambda: self._unary(self.stub.Enroll, request))
        assert isinstance(reply, m.EnrollReply)
        self.run_id, self.worker_id, self.session = reply.run_id, reply.worker_id, reply.session_token
        return reply

    def roster(self, round_: int) -> m.RosterReply:
        request = m.RosterRequest(envelope=self._envelope(round_))
        reply = self._call(lambda: self._unary(self.stub.Roster, request, timeout=ROSTER_TIMEOUT_S))
        assert isinstance(reply, m.RosterReply)
        return reply

    def report(self, round_: int, metrics: dict[str, float]) -> None:
        request = m.ReportRequest(envelope=self._envelope(round_), metrics=dict(metrics))
        self._call(lambda: self._unary(self.stub.Report, request))

    def heartbeat(self, round_: int = 0, retry: bool = True) -> m.HeartbeatReply:
        """A periodic beat passes `retry=False`: the next beat is its retry (worker.client, `heartbeat`)."""
        request = m.HeartbeatRequest(envelope=self._envelope(round_))
        reply = self._call(lambda: self._unary(self.stub.Heartbeat, request, timeout=HEARTBEAT_TIMEOUT_S), retry=retry)
        assert isinstance(reply, m.HeartbeatReply)
        return reply

    def attest_base(self, digest: str) -> str:
        """State the digest of this node's frozen base weights; the run's (a mismatch is refused)."""
        request = m.AttestRequest(envelope=self._envelope(), base_digest=digest)
        reply = self._call(lambda: self._unary(self.stub.AttestBase, request))
        assert isinstance(reply, m.AttestReply)
        return reply.run_base_digest

    def leave(self, reason: str = "done") -> None:
        self._unary(self.stub.Leave, m.LeaveRequest(envelope=self._envelope(), reason=reason), timeout=10.0)
