"""The Rendezvous gRPC servicer of a gossip run: thin, like the coordinator's. It converts wire messages with
`serde`, calls `coordinator.rendezvous.Rendezvous`, and maps `Rejected` / `WireError` onto gRPC status codes
whose message says exactly what was wrong.

It counts the serialized bytes of every request and reply per worker (`bytes_by_worker`), refused calls
included: the proof that no tensor passes through the coordinator of a gossip run is that these stay at a few
kilobytes per worker while the workers' own counters (their peers' streams) run to megabytes.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import grpc

from coordinator.errors import Code, Rejected
from coordinator.rendezvous import Rendezvous
from protocols.wire import lowband_pb2_grpc, serde
from protocols.wire import messages as m
from protocols.wire.servicing import refuse

log = logging.getLogger(__name__)

# The longest a Roster call waits for the run's workers to enroll (every neighbour's address is needed);
# after it the roster is answered with whoever is there, and the worker asks again next round.
ROSTER_WAIT_S = 120.0



class RendezvousServicer(lowband_pb2_grpc.RendezvousServicer):
    def __init__(self, rendezvous: Rendezvous) -> None:
        self.rendezvous = rendezvous
        self._lock = threading.Lock()
        self._bytes: dict[str, list[int]] = {}  # worker id -> [sent by it, received by it]

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

    def _phase(self) -> m.Phase:
        if self.rendezvous.finished():
            return m.Phase.FINISHED
        if len(self.rendezvous.members) < self.rendezvous.cfg.cluster.workers:
            return m.Phase.WAITING_FOR_WORKERS
        return m.Phase.TRAINING

    def Enroll(self, request: Any, context: grpc.ServicerContext) -> Any:
        worker_id = ""
        try:
            req = serde.from_pb(request, m.EnrollRequest)
            env = req.envelope
            joined = self.rendezvous.join(req.hostname, env.token, env.protocol_version, req.address, env.worker_id)
            worker_id = joined.worker_id
            reply = serde.to_pb(m.EnrollReply(
                worker_id=joined.worker_id, worker_index=joined.index, run_id=joined.run_id,
                config_yaml=joined.config_yaml,
                heartbeat_interval_s=self.rendezvous.cfg.cluster.heartbeat_interval_s,
            ))  # fmt: skip
            self._count(worker_id, request, reply)
            return reply
        except (Rejected, m.WireError) as err:
            refuse(context, err)

    def Roster(self, request: Any, context: grpc.ServicerContext) -> Any:
        env = None
        try:
            req = serde.from_pb(request, m.RosterRequest)
            env = req.envelope
            self._check_run(env)
            self.rendezvous.wait_joined(ROSTER_WAIT_S)
            roster = self.rendezvous.roster(env.worker_id, env.token, env.round)
            reply = serde.to_pb(m.RosterReply(round=roster.round, workers=roster.workers, finished=roster.finished,
                                              addresses=dict(roster.addresses)))
            self._count(env.worker_id, request, reply)
            return reply
        except (Rejected, m.WireError) as err:
            self._count(env.worker_id if env else "", request, None)
            refuse(context, err)

    def Report(self, request: Any, context: grpc.ServicerContext) -> Any:
        env = None
        try:
            req = serde.from_pb(request, m.ReportRequest)
            env = req.envelope
            self._check_run(env)
            self.rendezvous.report(env.worker_id, env.token, env.round, dict(req.metrics))
            reply = serde.to_pb(m.ReportReply())
            self._count(env.worker_id, request, reply)
            return reply
        except (Rejected, m.WireError) as err:
            self._count(env.worker_id if env else "", request, None)
            refuse(context, err)

    def Heartbeat(self, request: Any, context: grpc.ServicerContext) -> Any:
        env = None
        try:
            req = serde.from_pb(request, m.HeartbeatRequest)
            env = req.envelope
            self._check_run(env)
            loss = None if req.last_loss != req.last_loss else req.last_loss  # NaN means "no loss yet"
            eval_loss = None if req.eval_loss != req.eval_loss else req.eval_loss
            self.rendezvous.heartbeat(env.worker_id, env.token, req.inner_step, loss, eval_loss)
            reply = serde.to_pb(m.HeartbeatReply(round=self.rendezvous.next_row, phase=self._phase()))
            self._count(env.worker_id, request, reply)
            return reply
        except (Rejected, m.WireError) as err:
            self._count(env.worker_id if env else "", request, None)
            refuse(context, err)

    def AttestBase(self, request: Any, context: grpc.ServicerContext) -> Any:
        env = None
        try:
            req = serde.from_pb(request, m.AttestRequest)
            env = req.envelope
            self._check_run(env)
            digest = self.rendezvous.attest_base(env.worker_id, env.token, req.base_digest)
            reply = serde.to_pb(m.AttestReply(run_base_digest=digest))
            self._count(env.worker_id, request, reply)
            return reply
        except (Rejected, m.WireError) as err:
            self._count(env.worker_id if env else "", request, None)
            refuse(context, err)

    def Leave(self, request: Any, context: grpc.ServicerContext) -> Any:
        env = None
        try:
            req = serde.from_pb(request, m.LeaveRequest)
            env = req.envelope
            self._check_run(env)
            self.rendezvous.leave(env.worker_id, env.token)
            reply = serde.to_pb(m.LeaveReply())
            self._count(env.worker_id, request, reply)
            return reply
        except (Rejected, m.WireError) as err:
            self._count(env.worker_id if env else "", request, None)
            refuse(context, err)
