"""The gRPC servicer: thin. It converts wire messages with `serde`, calls the state machine, and maps
`Rejected` / `WireError` onto gRPC status codes whose message says exactly what was wrong (anything
unexpected: INTERNAL, never UNKNOWN; see `protocols/wire/servicing.py`).

No client can hold the coordinator: push streams, long polls and state pulls each have a bounded number of
slots (`CallLimits`; one more is refused at once with RESOURCE_EXHAUSTED), the server's bound on open calls has
room for all of them plus the quick calls (heartbeats, joins), and a stream that waits longer than
`cluster.stream_idle_s` for its client (a push's next message, its header: at most HEADER_WAIT_S; a pull's
client taking the next one) is ended with DEADLINE_EXCEEDED. The token and round of a push are checked from
its header, before any payload is buffered.

Admission: a push whose header passed then needs one of PUSH_READS_PER_CORE admission slots per core to have its
payload read. It waits for one in turn, up to ADMISSION_WAIT_S, reading nothing meanwhile (what the client
sent waits in gRPC's flow-control window), and is then refused with the busy RESOURCE_EXHAUSTED, which the
worker's client retries with backoff. Once read, decoding, checking and folding it waits for one of
DECODES_PER_CORE slots per core (a decoded update is several times its wire size). So however many workers
push at once, the coordinator buffers and decodes only as many updates as its cores can work on, and the
others queue instead of all crawling at once. A worker's client first waits for its slot in a ReservePush long
poll, which keeps the slot for it (coordinator/reservations.py), and only then opens the push's stream: a push
that waits inside its stream has already sent what the stream's window lets through, often the whole update, and
that waits in the coordinator's buffers. A push's deadline, PUSH_BASE_S plus its declared bytes at
MIN_PUSH_RATE, starts once it is admitted; it must finish by then however it paces its messages. Pulls (an
aggregate, a whole replica) are admitted alike, SENDS_PER_CORE per core at once, before their stream starts:
a round's pulls all come at once, and each pull in flight holds a serialized chunk (1 MiB) in gRPC's buffers.

Threads: an open call is a coroutine on the server's event loop (coordinator/server.py), so a thousand workers
waiting in long polls hold no thread each. Work runs on a few pools: a push is read, decoded and folded on one of the
push threads (`push_work`), as many as pushes are read at once (torch keeps per-thread state in every thread that
ran it: bench/call_memory.py, BENCHMARKS.md); calls that may wait on the state's lock on `calls`; heartbeats on
`liveness`."""

from __future__ import annotations

import asyncio
import logging
import math
import os
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent import futures
from functools import partial
from typing import Any, TypeVar

import grpc

from compression.payload import dense
from coordinator.errors import Code, Rejected
from coordinator.reservations import Reservations
from coordinator.round_signal import RoundSignal
from coordinator.state import AlreadyFolded, CoordinatorState, Phase
from coordinator.status import status_reply
from protocols.base import Aggregate, Update
from protocols.config import RunConfig
from protocols.wire import lowband_pb2_grpc, serde
from protocols.wire import messages as m
from protocols.wire.aio_servicing import GuardedReader, answered_async, send_within
from protocols.wire.servicing import Slots, request_readers

log = logging.getLogger(__name__)
T = TypeVar("T")

_PHASE = {
    Phase.WAITING: m.Phase.WAITING_FOR_WORKERS,
    Phase.TRAINING: m.Phase.TRAINING,
    Phase.FINISHED: m.Phase.FINISHED,
}
# A worker never needs to wait longer than this per WaitRound call; it simply asks again.
MAX_WAIT_S = 30.0
# A push stream's header must arrive within this (or cluster.stream_idle_s, if shorter): an unauthenticated
# stream holds its slot no longer.
HEADER_WAIT_S = 10.0
# An authenticated push must finish within PUSH_BASE_S + its declared bytes / MIN_PUSH_RATE seconds.
PUSH_BASE_S = 120.0
MIN_PUSH_RATE = 32 << 10  # bytes per second: 1 GiB within 9 hours
# Pushes admitted at once per core (payload read and buffered): a push's reading goes at its client's pace,
# so enough of them to keep the cores busy, not all (a 1,000-worker bench with 2,004 at once on 2 cores ran
# hundreds of them past their deadline together, BENCHMARKS.md "Coordinator scale"). Each one read holds its
# update in gRPC's buffers, then as bytes, a message and tensors: 8 per core instead of 32 took the peak at 1,000
# workers from 6.9-7.2x the model to 6.3x, rounds within the machine's spread (BENCHMARKS.md "What the peak holds").
PUSH_READS_PER_CORE = 8
# Of the pushes read, decoded, checked and folded at once per core: CPU work, and a decoded update holds several times
# its wire bytes, so more at once only costs memory.
DECODES_PER_CORE = 2
# Pulls sent at once per core: a round's bytes are mostly its pulls (every worker pulls the whole aggregate), so
# more of them at once than pushes, each holding one serialized chunk in gRPC's buffers.
SENDS_PER_CORE = 32
# How long an authenticated push waits for admission before it is refused as busy (and retried by its client),
# well within the client's own 600 s limit on a push. Refusing at once instead made 1,000 bench clients retry
# about 200 times a second, their CPU and the coordinator's going into refused streams; with 60 s, a 1,000-push
# queue draining at ~2.4 pushes/s on the loaded 2-core bench machine still refused ~1,900 as busy.
ADMISSION_WAIT_S = 300.0
# How long a slot kept by ReservePush waits for its worker's push (coordinator/reservations.py): the push follows
# the reply at once, so this only bounds what a worker that reserved and vanished keeps from the others.
RESERVATION_HOLD_S = 10.0
# Threads for the calls that may wait on the state's lock (a fold or a round close holds it): they queue for these,
# not for one each. Heartbeats and proof of life take the member tally alone, on threads of their own.
CALL_THREADS = 8
LIVENESS_THREADS = 4


def _wait_s(asked: float) -> float:
    """A long poll's wait: what the worker asked (0: the server's default), at most MAX_WAIT_S."""
    if not (math.isfinite(asked) and asked >= 0):
        raise Rejected(Code.INVALID_ARGUMENT, f"max_wait_s must be a finite number of seconds >= 0, got {asked}")
    return min(asked or MAX_WAIT_S, MAX_WAIT_S)


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class CallLimits:
    """How many calls of each long-running kind may be in flight at once, and the server's bound on calls open at
    once that makes room for all of them plus the quick calls. An open call is a coroutine, not a thread (the
    asyncio server, coordinator/server.py): these bound the memory and work that calls in flight take."""

    def __init__(self, workers: int) -> None:
        self.pushes = 2 * workers + 4  # each worker pushes one at a time; the rest is for retries and strangers
        # Of those, how many may be past their header (admitted: payload read) at once, and of those how many
        # may be decoded at once.
        self.admitted = min(self.pushes, max(1, PUSH_READS_PER_CORE * _cores()))
        self.sends = max(1, SENDS_PER_CORE * _cores())  # pulls being sent at once
        self.decodes = min(self.admitted, max(1, DECODES_PER_CORE * _cores()))
        self.waits = 2 * workers + 2
        self.reserves = 2 * workers + 2  # ReservePush long polls: one per worker, and room for retries
        self.pulls = 2 * workers + 2
        quick = 8  # joins, heartbeats, leaves, attests: they never block
        self.readers = request_readers(workers)  # calls whose request is still arriving (server.py: AsyncRequestGuard)
        self.calls = self.pushes + self.waits + self.reserves + self.pulls + quick + self.readers
        # Past this bound gRPC refuses calls with RESOURCE_EXHAUSTED.
        self.max_concurrent_rpcs = self.calls + 4 * workers + 16

    @classmethod
    def of(cls, cfg: RunConfig) -> CallLimits:
        return cls(cfg.cluster.workers)


class EncodedAggregates:
    """The aggregates workers pull, each encoded and serialized once (`serde.EncodedAggregate`) and shared by all
    its pulls, instead of once per pull: a round's pulls come all at once, one per worker. Keeps the last `keep`
    rounds' (pulls of older ones encode again)."""

    def __init__(self, chunk_bytes: int, keep: int = 2) -> None:
        self.chunk_bytes, self.keep = chunk_bytes, keep
        self._lock = threading.Lock()
        self._by_round: dict[int, tuple[Aggregate, serde.EncodedAggregate]] = {}
        self.encoded = 0  # aggregates encoded so far (tests)

    def kept(self, aggregate: Aggregate) -> serde.EncodedAggregate | None:
        """This aggregate's encoding if it is kept, without waiting: every pull but a round's first finds it so,
        and is served on the loop instead of a hop to a thread and back."""
        kept = self._by_round.get(aggregate.round)  # one dict read: atomic, `of` replaces entries whole
        return kept[1] if kept is not None and kept[0] is aggregate else None

    def of(self, aggregate: Aggregate) -> serde.EncodedAggregate:
        with self._lock:  # a round's first pull encodes; the ones arriving meanwhile wait for it, then share it
            kept = self.kept(aggregate)
            if kept is not None:
                return kept
            encoded = serde.EncodedAggregate.of(aggregate, self.chunk_bytes)
            self.encoded += 1
            self._by_round[aggregate.round] = (aggregate, encoded)
            for old in sorted(self._by_round)[:-self.keep]:
                del self._by_round[old]
            return encoded


class CoordinatorServicer(lowband_pb2_grpc.CoordinatorServicer):
    """The coordinator's RPCs as coroutines on the server's event loop (protocols/wire/aio_servicing.py): an open
    call holds no thread. What may wait on the state's lock (taken by a fold or a round close) runs on `calls`'
    threads, heartbeats and proof of life on `liveness`' (they take the member tally alone), and pushes are read,
    decoded and folded on `push_work`'s."""

    def __init__(self, state: CoordinatorState, chunk_bytes: int = m.DEFAULT_CHUNK_BYTES) -> None:
        self.state = state
        self.chunk_bytes = chunk_bytes
        limits = CallLimits.of(state.cfg)
        self.push_slots = Slots("push streams", limits.pushes)
        self.admitted = Slots("pushes being received and decoded", limits.admitted)
        self.decoding = Slots("pushes being decoded", limits.decodes)
        self.reservations = Reservations(self.admitted, RESERVATION_HOLD_S)
        self.sending = Slots("pulls being sent", limits.sends)
        self.wait_slots = Slots("WaitRound calls", limits.waits)
        self.reserve_slots = Slots("ReservePush calls", limits.reserves)
        self.pull_slots = Slots("state or aggregate pulls", limits.pulls)
        self.aggregates = EncodedAggregates(chunk_bytes)
        self.idle_s = state.cfg.cluster.stream_idle_s
        self.calls = futures.ThreadPoolExecutor(max_workers=CALL_THREADS, thread_name_prefix="lowband-call")
        self.liveness = futures.ThreadPoolExecutor(max_workers=LIVENESS_THREADS, thread_name_prefix="lowband-beat")
        # A push's payload is read into tensors and decoded with torch, and a thread that ran torch once keeps
        # ~35 KB of torch's per-thread state for as long as it lives (bench/call_memory.py): as many push threads
        # as pushes are read at once (`admitted`, plus the rare push still waiting for its header or for
        # admission), created only as needed.
        self.push_work = futures.ThreadPoolExecutor(max_workers=limits.pushes, thread_name_prefix="lowband-push")
        self.round_moved = RoundSignal()
        state.round_listeners.append(self.round_moved.fire)

    def close(self) -> None:
        """Stop taking work (the server has stopped): the threads end once what they run has."""
        self.state.round_listeners.remove(self.round_moved.fire)
        for pool in (self.push_work, self.calls, self.liveness):
            pool.shutdown(wait=False, cancel_futures=True)

    async def _on(self, pool: futures.Executor, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)

    async def _locked(self, fn: Callable[..., T], *args: Any) -> T:
        """A quick read under the state's lock: on the loop when the lock is free, else on `calls`, which may wait
        for it. (With a hop to a thread and back for every such read, a round took 11% more of the coordinator's
        CPU at 100 workers: BENCHMARKS.md "The coordinator on an asyncio server".)"""
        done, result = self.state.if_unlocked(fn, *args)
        return result if done else await self._on(self.calls, fn, *args)

    async def _liveness(self, fn: Callable[..., T], *args: Any) -> T:
        """Proof of life or a heartbeat: once training started they take the member tally alone (never held long),
        on the loop. Before, they may start the run, under the state's lock, on `liveness`."""
        if self.state.phase is not Phase.WAITING:
            return fn(*args)
        return await self._on(self.liveness, fn, *args)

    def _check_run(self, env: m.Envelope) -> None:
        if env.run_id and env.run_id != self.state.run_id:
            raise Rejected(Code.FAILED_PRECONDITION, f"wrong run id {env.run_id!r} (this run is {self.state.run_id!r})")

    async def _attend(self, env: m.Envelope, context: grpc.aio.ServicerContext) -> None:
        """Check the caller, and count it alive until this call ends (`CoordinatorState.attend`): at a thousand
        workers, the heartbeats it spares the workers waiting in long polls were 13% of the coordinator's CPU."""
        end = await self._liveness(self.state.attend, env.worker_id, env.token)
        context.add_done_callback(lambda _: end())
        if context.done():  # it ended meanwhile, perhaps before the callback was there (`end` counts once)
            end()

    @answered_async
    async def Join(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self._on(self.calls, self._join, request)

    def _join(self, request: Any) -> Any:
        req = serde.from_pb(request, m.JoinRequest)
        env = req.envelope
        self._check_run(env)
        member, session = self.state.join_session(req.hostname, env.token, env.protocol_version, env.worker_id,
                                                  req.software_version, req.config_hash)
        reply = m.JoinReply(
            worker_id=member.worker_id,
            worker_index=member.index,
            run_id=self.state.run_id,
            round=self.state.round,
            config_yaml=self.state.config_yaml,
            has_global_state=not self.state.must_offer_state(member.worker_id),
            heartbeat_interval_s=self.state.cfg.cluster.heartbeat_interval_s,
            config_hash=self.state.config_hash,
            session_token=session,
        )
        return serde.to_pb(reply)

    @answered_async
    async def Heartbeat(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self._liveness(self._heartbeat, request)

    def _heartbeat(self, request: Any) -> Any:
        req = serde.from_pb(request, m.HeartbeatRequest)
        self._check_run(req.envelope)
        loss = None if req.last_loss != req.last_loss else req.last_loss  # NaN means "no loss yet"
        eval_loss = None if req.eval_loss != req.eval_loss else req.eval_loss
        self.state.heartbeat(req.envelope.worker_id, req.envelope.token, req.inner_step, loss, eval_loss)
        return serde.to_pb(m.HeartbeatReply(round=self.state.round, phase=_PHASE[self.state.phase]))

    @answered_async
    async def AttestBase(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        req = serde.from_pb(request, m.AttestRequest)
        self._check_run(req.envelope)
        digest = await self._on(self.calls, self.state.attest_base, req.envelope.worker_id, req.envelope.token,
                                req.base_digest)
        return serde.to_pb(m.AttestReply(run_base_digest=digest))

    @answered_async
    async def Leave(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        req = serde.from_pb(request, m.LeaveRequest)
        self._check_run(req.envelope)
        await self._on(self.calls, self.state.leave, req.envelope.worker_id, req.envelope.token)
        return serde.to_pb(m.LeaveReply())

    # The stream is written by the coroutine (`_send`), which the generated base's iterator signature does not know.
    @answered_async
    async def PullState(self, request: Any, context: grpc.aio.ServicerContext) -> None:  # type: ignore[override]
        req = serde.from_pb(request, m.PullRequest)
        self._check_run(req.envelope)
        await self._attend(req.envelope, context)
        with self.pull_slots.hold():
            await self.sending.acquire_async(ADMISSION_WAIT_S)  # in turn for a sender; busy (retried) past the wait
            try:
                messages = await self._on(self.calls, self._state_stream, req)
                # Each chunk is copied into its message on a thread: a whole replica is seconds of the loop's time.
                sent = await self._send(request, context, messages, on=self.calls)
            finally:
                self.sending.release()
        self.state.count_download(req.envelope.worker_id, sent, "state")

    def _state_stream(self, req: m.PullRequest) -> Iterator[Any]:
        snap = self.state.snapshot(req.envelope.worker_id, req.envelope.token, req.resync)
        entries = {name: dense(t) for name, t in snap.replica.to_tensors().items()}
        header = m.StateHeader(
            round=snap.round,
            num_entries=len(entries),
            total_bytes=sum(p.nbytes() for p in entries.values()),
            state_hash=snap.state_hash,
        )
        return _released_after(serde.pull_stream(header, entries, self.chunk_bytes), snap.release)

    @answered_async
    async def PullAggregate(self, request: Any, context: grpc.aio.ServicerContext) -> None:  # type: ignore[override]
        req = serde.from_pb(request, m.AggregateRequest)
        self._check_run(req.envelope)
        await self._attend(req.envelope, context)
        with self.pull_slots.hold():
            aggregate, state_hash, own = await self._locked(self.state.aggregate_for, req.envelope.worker_id,
                                                            req.envelope.token, req.round)
            encoded = self.aggregates.kept(aggregate)
            if encoded is None:  # the round's first pull encodes it, on a thread
                encoded = await self._on(self.calls, self.aggregates.of, aggregate)
            await self.sending.acquire_async(ADMISSION_WAIT_S)  # in turn; busy (retried) past the wait
            try:
                sent = await self._send(request, context, encoded.stream(state_hash, omit=own))
            finally:
                self.sending.release()
        self.state.count_download(req.envelope.worker_id, sent)

    async def _send(self, request: Any, context: grpc.aio.ServicerContext, messages: Iterator[Any],
                    on: futures.Executor | None = None) -> int:
        """Write a response stream (messages, or bytes serialized ahead; each taken from `messages` on `on`'s
        threads if given) that the client must keep reading (`send_within`); returns the bytes sent. The request
        that opened it is control traffic, counted once the stream started (coordinator/traffic.py)."""
        sent = 0
        try:
            while True:
                msg = next(messages, None) if on is None else await self._on(on, next, messages, None)
                if msg is None:
                    return sent
                await send_within(context, msg, self.idle_s)
                if not sent:
                    self.state.count_control(request.envelope.worker_id, request.ByteSize(), 0)
                sent += len(msg) if isinstance(msg, bytes) else msg.ByteSize()
        finally:  # a stream ended early gives back what it holds now (a lent replica), not when it is collected
            close = getattr(messages, "close", None)
            if close is not None:
                close()

    @answered_async
    async def ReservePush(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        req = serde.from_pb(request, m.ReserveRequest)
        env = req.envelope
        self._check_run(env)
        wait = _wait_s(req.max_wait_s)
        try:  # judged as its push's header would be
            await self._on(self.calls, partial(self.state.check_push, env.worker_id, env.token, env.round, False,
                                               record_late=False))
        except AlreadyFolded:  # a retry whose update is in: its push is answered from the header, no slot needed
            return serde.to_pb(m.ReserveReply(reserved=True, hold_s=0.0))
        await self._attend(env, context)
        with self.reserve_slots.hold():
            reserved = await self.reservations.reserve(env.worker_id, wait)
        return serde.to_pb(m.ReserveReply(reserved=reserved, hold_s=RESERVATION_HOLD_S))

    @answered_async
    async def WaitRound(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        req = serde.from_pb(request, m.WaitRequest)
        self._check_run(req.envelope)
        await self._attend(req.envelope, context)
        wait = _wait_s(req.max_wait_s)
        with self.wait_slots.hold():
            await self.round_moved.wait_past(self.state, req.after_round, wait)
            round_, phase, state_hash, (epoch, shard, shards) = await self._locked(
                self.state.wait_for_round_dealt, req.envelope.worker_id, req.after_round, 0.0)
        info = m.RoundInfo(round_, _PHASE[phase], state_hash, self.state.total_rounds, self.state.target_round_s,
                           membership_epoch=epoch, shard_index=shard, shard_count=shards)
        return serde.to_pb(info)

    @answered_async
    async def PushUpdate(self, request_iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
        loop = asyncio.get_running_loop()
        with self.push_slots.hold():
            stream = GuardedReader(request_iterator, loop, min(self.idle_s, HEADER_WAIT_S))
            admission: list[Callable[[], None]] = []  # the admitted slot's release, once it holds one

            def refuse_early(header: m.PushHeader) -> None:  # on the push thread, before any payload is read
                env = header.envelope
                self._check_run(env)
                initial = header.kind is m.PushKind.INITIAL_STATE
                self.state.check_push(env.worker_id, env.token, env.round, initial, header.base_state_hash)
                asyncio.run_coroutine_threadsafe(self._attend(env, context), loop).result()
                if not self.reservations.take(env.worker_id):  # the slot its ReservePush kept is now this push's
                    self.admitted.acquire(ADMISSION_WAIT_S)  # else in turn; busy (retried) past the wait
                admission.append(self.admitted.release)
                # Authenticated and admitted: from now on the stream may pause up to the idle limit, and must end
                # in time.
                stream.idle_s = self.idle_s
                stream.set_deadline(PUSH_BASE_S + header.total_bytes / MIN_PUSH_RATE)

            work = loop.run_in_executor(self.push_work, self._read_and_apply, stream, refuse_early)
            # The admitted slot comes back when the push thread is done with it, also if this call ends first.
            work.add_done_callback(lambda _: [release() for release in admission])
            try:
                return await asyncio.shield(work)
            except AlreadyFolded as done:  # a retry after a lost reply: the same answer, nothing folded twice
                return serde.to_pb(m.PushReply(accepted=True, round=done.round, bytes_received=stream.nbytes))

    def _read_and_apply(self, stream: GuardedReader, refuse_early: Callable[[m.PushHeader], None]) -> Any:
        """On a push thread: the whole stream read (its header judged first), decoded, checked and folded."""
        header, entries = serde.read_push(stream, self.state.max_push_bytes, refuse_early)
        with self.decoding.hold(None):  # it waits its turn, however long: its payload is here
            return self._apply_push(header, entries, stream.nbytes)

    def _apply_push(self, header: m.PushHeader, entries: dict[str, Any], nbytes: int) -> Any:
        env = header.envelope
        if header.kind is m.PushKind.INITIAL_STATE:
            # The payloads were assembled here from the stream, nobody else holds them: kept without a copy.
            self.state.offer_initial_state(env.worker_id, env.token, entries, nbytes, owned=True)
            round_ = self.state.round
        else:
            metrics = dict(header.metrics)
            metrics.setdefault("tokens", float(header.tokens))
            if header.train_loss == header.train_loss:
                metrics.setdefault("train_loss", header.train_loss)
            update = Update(payloads=entries, weight=header.weight, base=header.base_state_hash)
            round_ = self.state.submit(env.worker_id, env.token, env.round, update, metrics, nbytes)
        return serde.to_pb(m.PushReply(accepted=True, round=round_, bytes_received=nbytes))

    @answered_async
    async def Status(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self._on(self.calls, lambda: serde.to_pb(status_reply(self.state, serde.from_pb(
            request, m.StatusRequest))))


def _released_after(messages: Iterator[Any], release: Callable[[], None]) -> Iterator[Any]:
    """`messages`, then `release` once they are sent, or the stream ends early (or is dropped unfinished: a
    generator closed by the garbage collector runs its `finally` too)."""
    try:
        yield from messages
    finally:
        release()
