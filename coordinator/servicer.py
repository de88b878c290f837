"""The gRPC servicer: thin. It converts wire messages with `serde`, calls the state machine, and maps
`Rejected` / `WireError` onto gRPC status codes whose message says exactly what was wrong."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from typing import Any

import grpc

from compression.payload import dense
from coordinator.errors import Code, Rejected
from coordinator.state import AlreadyFolded, CoordinatorState, Phase
from protocols.base import Update
from protocols.wire import lowband_pb2_grpc, serde
from protocols.wire import messages as m
from protocols.wire.servicing import CountingIterator, refuse

log = logging.getLogger(__name__)

_PHASE = {
    Phase.WAITING: m.Phase.WAITING_FOR_WORKERS,
    Phase.TRAINING: m.Phase.TRAINING,
    Phase.FINISHED: m.Phase.FINISHED,
}
# A worker never needs to wait longer than this per WaitRound call; it simply asks again.
MAX_WAIT_S = 30.0



class CoordinatorServicer(lowband_pb2_grpc.CoordinatorServicer):
    def __init__(self, state: CoordinatorState, chunk_bytes: int = m.DEFAULT_CHUNK_BYTES) -> None:
        self.state = state
        self.chunk_bytes = chunk_bytes

    def _check_run(self, env: m.Envelope) -> None:
        if env.run_id and env.run_id != self.state.run_id:
            raise Rejected(Code.FAILED_PRECONDITION, f"wrong run id {env.run_id!r} (this run is {self.state.run_id!r})")

    def Join(self, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            req = serde.from_pb(request)
            assert isinstance(req, m.JoinRequest)
            env = req.envelope
            self._check_run(env)
            member = self.state.join(req.hostname, env.token, env.protocol_version, env.worker_id)
            reply = m.JoinReply(
                worker_id=member.worker_id,
                worker_index=member.index,
                run_id=self.state.run_id,
                round=self.state.round,
                config_yaml=self.state.config_yaml,
                has_global_state=not self.state.must_offer_state(member.worker_id),
                heartbeat_interval_s=self.state.cfg.cluster.heartbeat_interval_s,
            )
            return serde.to_pb(reply)
        except (Rejected, m.WireError) as err:
            refuse(context, err)

    def Heartbeat(self, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            req = serde.from_pb(request)
            assert isinstance(req, m.HeartbeatRequest)
            self._check_run(req.envelope)
            loss = None if req.last_loss != req.last_loss else req.last_loss  # NaN means "no loss yet"
            eval_loss = None if req.eval_loss != req.eval_loss else req.eval_loss
            self.state.heartbeat(req.envelope.worker_id, req.envelope.token, req.inner_step, loss, eval_loss)
            return serde.to_pb(m.HeartbeatReply(round=self.state.round, phase=_PHASE[self.state.phase]))
        except (Rejected, m.WireError) as err:
            refuse(context, err)

    def AttestBase(self, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            req = serde.from_pb(request)
            assert isinstance(req, m.AttestRequest)
            self._check_run(req.envelope)
            digest = self.state.attest_base(req.envelope.worker_id, req.envelope.token, req.base_digest)
            return serde.to_pb(m.AttestReply(run_base_digest=digest))
        except (Rejected, m.WireError) as err:
            refuse(context, err)

    def Leave(self, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            req = serde.from_pb(request)
            assert isinstance(req, m.LeaveRequest)
            self._check_run(req.envelope)
            self.state.leave(req.envelope.worker_id, req.envelope.token)
            return serde.to_pb(m.LeaveReply())
        except (Rejected, m.WireError) as err:
            refuse(context, err)

    def PullState(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        try:
            req = serde.from_pb(request)
            assert isinstance(req, m.PullRequest)
            self._check_run(req.envelope)
            snap = self.state.snapshot(req.envelope.worker_id, req.envelope.token, req.resync)
        except (Rejected, m.WireError) as err:
            refuse(context, err)
        entries = {name: dense(t) for name, t in snap.replica.to_tensors().items()}
        header = m.StateHeader(
            round=snap.round,
            num_entries=len(entries),
            total_bytes=sum(p.nbytes() for p in entries.values()),
            state_hash=snap.state_hash,
        )
        sent = 0
        for msg in serde.pull_stream(header, entries, self.chunk_bytes):
            sent += msg.ByteSize()
            yield msg
        self.state.count_download(req.envelope.worker_id, sent)

    def PullAggregate(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        try:
            req = serde.from_pb(request)
            assert isinstance(req, m.AggregateRequest)
            self._check_run(req.envelope)
            aggregate, state_hash, own = self.state.aggregate_for(req.envelope.worker_id, req.envelope.token, req.round)
        except (Rejected, m.WireError) as err:
            refuse(context, err)
        entries, weights = serde.aggregate_entries(aggregate, omit=own)
        header = m.AggregateHeader(
            round=aggregate.round,
            num_entries=len(entries),
            total_bytes=sum(p.nbytes() for p in entries.values()),
            state_hash=state_hash,
            relayed_weights=weights,
            own_slot=0 if own is None else own + 1,
        )
        sent = 0
        for msg in serde.aggregate_stream(header, entries, self.chunk_bytes):
            sent += msg.ByteSize()
            yield msg
        self.state.count_download(req.envelope.worker_id, sent)

    def WaitRound(self, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            req = serde.from_pb(request)
            assert isinstance(req, m.WaitRequest)
            self._check_run(req.envelope)
            self.state.check_member(req.envelope.worker_id, req.envelope.token)
            if not (math.isfinite(req.max_wait_s) and req.max_wait_s >= 0):
                raise Rejected(Code.INVALID_ARGUMENT, f"max_wait_s must be a finite number of seconds >= 0, got "
                                                      f"{req.max_wait_s}")
            wait = min(req.max_wait_s or MAX_WAIT_S, MAX_WAIT_S)
            round_, phase, state_hash = self.state.wait_for_round(req.after_round, wait)
            info = m.RoundInfo(round_, _PHASE[phase], state_hash, self.state.total_rounds, self.state.target_round_s)
            return serde.to_pb(info)
        except (Rejected, m.WireError) as err:
            refuse(context, err)

    def PushUpdate(self, request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Any:
        counted = CountingIterator(request_iterator)

        def refuse_early(header: m.PushHeader) -> None:
            env = header.envelope
            self._check_run(env)
            initial = header.kind is m.PushKind.INITIAL_STATE
            self.state.check_push(env.worker_id, env.token, env.round, initial)

        try:
            header, entries = serde.read_push(counted, self.state.max_push_bytes, refuse_early)
            env = header.envelope
            if header.kind is m.PushKind.INITIAL_STATE:
                self.state.offer_initial_state(env.worker_id, env.token, entries, counted.nbytes)
                round_ = self.state.round
            else:
                metrics = dict(header.metrics)
                metrics.setdefault("tokens", float(header.tokens))
                if header.train_loss == header.train_loss:
                    metrics.setdefault("train_loss", header.train_loss)
                update = Update(payloads=entries, weight=header.weight)
                round_ = self.state.submit(env.worker_id, env.token, env.round, update, metrics, counted.nbytes)
            return serde.to_pb(m.PushReply(accepted=True, round=round_, bytes_received=counted.nbytes))
        except AlreadyFolded as done:  # a retry after a lost reply: the same answer, nothing folded twice
            return serde.to_pb(m.PushReply(accepted=True, round=done.round, bytes_received=counted.nbytes))
        except (Rejected, m.WireError) as err:
            refuse(context, err)

