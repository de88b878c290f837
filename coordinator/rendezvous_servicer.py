"""The Rendezvous gRPC servicer of a gossip run: thin, like the coordinator's. It converts wire messages with
`serde`, calls `coordinator.rendezvous.Rendezvous`, and maps `Rejected` / `WireError` onto gRPC status codes
whose message says exactly what was wrong (anything unexpected: INTERNAL, never UNKNOWN; see
`protocols/wire/servicing.py`).

Every call is unary, so a client that stalls its request holds no thread (gRPC hands a handler only a whole
request). The one call that waits, Roster (until the run's workers have enrolled, ROSTER_WAIT_S at most),
first checks that its caller is a member with the run's token, so a stranger is refused at once and holds
nothing; and at most `RendezvousLimits.rosters` of them wait at a time (one more: RESOURCE_EXHAUSTED at
once), so the server's threads always have room for heartbeats, reports and enrolls.

It counts the serialized bytes of every request and reply per worker (`bytes_by_worker`), refused calls
included: the proof that no tensor passes through the coordinator of a gossip run is that these stay at a few
kilobytes per worker while the workers' own counters (their peers' streams) run to megabytes.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import grpc

from coordinator.errors import Code, Rejected
from coordinator.rendezvous import Rendezvous
from protocols.config import RunConfig
from protocols.wire import lowband_pb2_grpc, serde
from protocols.wire import messages as m
from protocols.wire.servicing import Slots, answered, request_readers

log = logging.getLogger(__name__)

# The longest a Roster call waits for the run's workers to enroll (every neighbour's address is needed);
# after it the roster is answered with whoever is there, and the worker asks again next round.
ROSTER_WAIT_S = 120.0


class RendezvousLimits:
    """How many Roster calls may wait at once, and the thread pool and concurrency bound that make room for
    all of them plus the quick calls (enrolls, heartbeats, reports, leaves)."""

    def __init__(self, workers: int) -> None:
        self.rosters = 2 * workers + 2  # each worker waits in one at a time; the rest is for retries
        quick = 8
        self.readers = request_readers(workers)  # requests still arriving (rendezvous_server.py: UnaryRequestGuard)
        self.threads = self.rosters + quick + self.readers
        # Calls past the pool queue for a thread; past this bound gRPC refuses them with RESOURCE_EXHAUSTED.
        self.max_concurrent_rpcs = self.threads + 4 * workers + 16

    @classmethod
    def of(cls, cfg: RunConfig) -> RendezvousLimits:
        return cls(cfg.cluster.workers)



class RendezvousServicer(lowband_pb2_grpc.RendezvousServicer):
    def __init__(self, rendezvous: Rendezvous) -> None:
        self.rendezvous = rendezvous
        self._lock = threading.Lock()
        self._bytes: dict[str, list[int]] = {}  # worker id -> [sent by it, received by it]
        self.roster_slots = Slots("Roster calls", RendezvousLimits.of(rendezvous.cfg).rosters)

    def bytes_by_worker(self) -> dict[str, dict[str, int]]:
        """Per worker: the bytes it sent to the rendezvous, received from it, and both (serialized messages)."""
        with self._lock:
            return {w: {"bytes_sent": sent, "bytes_received": received, "bytes_total": sent + received}
                    for w, (sent, received) in self._bytes.items()}

    def _count(self, worker_id: str, request: Any, reply: Any | None) -> None:
        # Only members are counted: a refused call naming an unknown id must not grow the table.
        if worker_id not in self.rendezvous.members:
            return
        with self._lock:
            counts = self._bytes.setdefault(worker_id, [0, 0])
            counts[0] += request.ByteSize()
            counts[1] += reply.ByteSize() if reply is not None else 0

    def _check_run(self, env: m.Envelope) -> None:
        if env.run_id != self.rendezvous.run_id:
            raise Rejected(Code.FAILED_PRECONDITION,
                           f"wrong run id {env.run_id!r} (this run is {self.rendezvous.run_id!r})")

    def _serve(self, request: Any, kind: type[m.Message], answer: Callable[[Any], m.Message],
               run_checked: bool = True) -> Any:
        """Decode `request` as `kind`, check its run id (when `run_checked`), answer it; count the bytes both
        ways for the calling member, refused calls included (their request only)."""
        worker_id = ""
        try:
            req: Any = serde.from_pb(request, kind)
            env = req.envelope
            worker_id = env.worker_id
            if run_checked:
                self._check_run(env)
            reply = serde.to_pb(answer(req))
        except Exception:
            self._count(worker_id, request, None)
            raise
        self._count(worker_id, request, reply)
        return reply

    def _phase(self) -> m.Phase:
        if self.rendezvous.finished():
            return m.Phase.FINISHED
        if len(self.rendezvous.members) < self.rendezvous.cfg.cluster.workers:
            return m.Phase.WAITING_FOR_WORKERS
        return m.Phase.TRAINING

    @answered
    def Enroll(self, request: Any, context: grpc.ServicerContext) -> Any:
        def answer(req: m.EnrollRequest) -> m.Message:
            env = req.envelope
            if env.run_id and env.run_id != self.rendezvous.run_id:  # empty: a worker that does not know it yet
                self._check_run(env)
            joined = self.rendezvous.join(req.hostname, env.token, env.protocol_version, req.address, env.worker_id)
            return m.EnrollReply(worker_id=joined.worker_id, worker_index=joined.index, run_id=joined.run_id,
                                 config_yaml=joined.config_yaml,
                                 heartbeat_interval_s=self.rendezvous.cfg.cluster.heartbeat_interval_s,
                                 session_token=joined.session, peer_token=joined.peer_token)

        reply = self._serve(request, m.EnrollRequest, answer, run_checked=False)
        if reply.worker_id != request.envelope.worker_id:  # a new member: counted under the id it was given
            self._count(reply.worker_id, request, reply)
        return reply

    @answered
    def Roster(self, request: Any, context: grpc.ServicerContext) -> Any:
        def answer(req: m.RosterRequest) -> m.Message:
            env = req.envelope
            self.rendezvous.check_member(env.worker_id, env.token)  # a stranger waits for nothing
            with self.roster_slots.hold():
                self.rendezvous.wait_joined(ROSTER_WAIT_S)
            roster = self.rendezvous.roster(env.worker_id, env.token, env.round)
            return m.RosterReply(round=roster.round, workers=roster.workers, finished=roster.finished,
                                 addresses=dict(roster.addresses))

        return self._serve(request, m.RosterRequest, answer)

    @answered
    def Report(self, request: Any, context: grpc.ServicerContext) -> Any:
        def answer(req: m.ReportRequest) -> m.Message:
            env = req.envelope
            self.rendezvous.report(env.worker_id, env.token, env.round, dict(req.metrics))
            return m.ReportReply()

        return self._serve(request, m.ReportRequest, answer)

    @answered
    def Heartbeat(self, request: Any, context: grpc.ServicerContext) -> Any:
        def answer(req: m.HeartbeatRequest) -> m.Message:
            env = req.envelope
            loss = None if req.last_loss != req.last_loss else req.last_loss  # NaN means "no loss yet"
            eval_loss = None if req.eval_loss != req.eval_loss else req.eval_loss
            self.rendezvous.heartbeat(env.worker_id, env.token, req.inner_step, loss, eval_loss)
            return m.HeartbeatReply(round=self.rendezvous.next_row, phase=self._phase())

        return self._serve(request, m.HeartbeatRequest, answer)

    @answered
    def AttestBase(self, request: Any, context: grpc.ServicerContext) -> Any:
        def answer(req: m.AttestRequest) -> m.Message:
            env = req.envelope
            return m.AttestReply(run_base_digest=self.rendezvous.attest_base(env.worker_id, env.token,
                                                                             req.base_digest))

        return self._serve(request, m.AttestRequest, answer)

    @answered
    def Leave(self, request: Any, context: grpc.ServicerContext) -> Any:
        def answer(req: m.LeaveRequest) -> m.Message:
            env = req.envelope
            self.rendezvous.leave(env.worker_id, env.token)
            return m.LeaveReply()

        return self._serve(request, m.LeaveRequest, answer)
