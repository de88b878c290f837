"""The Peer gRPC service one gossip worker serves to its neighbours: thin, like the coordinator's servicer.

A Gossip stream is judged in two stages, so that nothing of a bad message is buffered or mixed:

1. from its header, before any chunk is read: protocol version, the run's peer token and id, a sender index of
   the run that is not this node, a round that matches the step, a step of the run, and the inbox's step
   window (not older than the step this node is at, not absurdly ahead, not a second message for a step);
2. once assembled: the whole message against this node's model (`peer_check.check_message`, the check the
   in-process hub runs too, so both transports refuse the same messages with the same words).

Refusals get a gRPC status whose message says exactly what was wrong: INVALID_ARGUMENT (malformed, wrong
names/shapes/dtypes/codec, NaN/Inf, unknown sender), FAILED_PRECONDITION (other run or protocol version,
stale or far-ahead step), ALREADY_EXISTS (a duplicate), UNAUTHENTICATED (bad token). Until this node knows
its own model (`open`), every stream is refused with UNAVAILABLE, which senders retry: a neighbour may
start gossiping while this node is still building its model.

No neighbour or stranger can hold the node: at most GOSSIP_SLOTS streams are served at once (one more is
refused at once with RESOURCE_EXHAUSTED "server busy", which senders retry), and a stream that waits longer
than the run's `cluster.stream_idle_s` for its next message (its header: at most HEADER_WAIT_S) is ended with
DEADLINE_EXCEEDED, as is one that runs past GOSSIP_BASE_S plus its declared bytes at MIN_GOSSIP_RATE
(`protocols/wire/servicing.py`). Anything unexpected is answered INTERNAL, never UNKNOWN.

Bytes are counted as serialized messages both ways (the request stream in, the ack out), as on the wire.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc

from protocols.config import PROTOCOL_VERSION
from protocols.refusals import Code, Rejected
from protocols.wire import lowband_pb2_grpc, serde
from protocols.wire import messages as m
from protocols.wire.servicing import CountingIterator, Slots, StreamWatchdog, abort, answered
from worker.transports.peer_check import PeerExpectation, check_message
from worker.transports.peer_inbox import PeerInbox
from worker.transports.peers import PeerMessage

log = logging.getLogger(__name__)

# How a not-ready refusal's message starts: senders retry it (the peer is alive, only still starting).
NOT_READY = "peer not ready"
# A Gossip stream's header must arrive within this (or the run's stream_idle_s, if shorter): an
# unauthenticated stream holds its slot no longer.
HEADER_WAIT_S = 10.0
# An admitted message must finish within GOSSIP_BASE_S + its declared bytes / MIN_GOSSIP_RATE seconds, however
# it paces its chunks (as the coordinator bounds a push).
GOSSIP_BASE_S = 120.0
MIN_GOSSIP_RATE = 32 << 10  # bytes per second
# Gossip streams served at once (one more: RESOURCE_EXHAUSTED "server busy", which senders retry). A node's
# in-neighbours send one message per step each, a few steps ahead at most; the server's thread pool is this
# plus room for the quick refusals (PEER_THREADS).
GOSSIP_SLOTS = 12
PEER_THREADS = GOSSIP_SLOTS + 4


@dataclass(frozen=True)
class PeerGate:
    """Who may send to this node, and what a valid message is: fixed once the node joined and built its model."""

    run_id: str
    token: str
    index: int  # this node
    workers: int
    gossip_steps: int  # Q: a message's round must be step // Q
    total_steps: int  # rounds * Q: the run's steps are 0..total_steps - 1
    expect: PeerExpectation  # this node's tensors and the run's codec
    idle_s: float = 30.0  # the run's cluster.stream_idle_s: a stream silent this long is ended


class PeerServicer(lowband_pb2_grpc.PeerServicer):
    def __init__(self, inbox: PeerInbox, count: Callable[[int, int], None]) -> None:
        """`count(sent, received)` adds wire bytes to the node's counters."""
        self.inbox, self.count = inbox, count
        self.gate: PeerGate | None = None
        self.slots = Slots("gossip streams", GOSSIP_SLOTS)
        self.watchdog = StreamWatchdog()

    def open(self, gate: PeerGate) -> None:
        """Start accepting messages judged by `gate` (one reference swap: handler threads see it whole)."""
        self.gate = gate

    def _admit_header(self, gate: PeerGate, header: m.PeerHeader) -> None:
        env = header.envelope
        if env.protocol_version != PROTOCOL_VERSION:
            raise Rejected(Code.FAILED_PRECONDITION, f"protocol version {env.protocol_version} is not supported "
                                                     f"(this peer speaks {PROTOCOL_VERSION})")  # fmt: skip
        if gate.token and not hmac.compare_digest(env.token.encode(), gate.token.encode()):
            raise Rejected(Code.UNAUTHENTICATED, "bad token: this peer's run peer token differs from the one sent")
        if env.run_id != gate.run_id:
            raise Rejected(Code.FAILED_PRECONDITION,
                           f"wrong run id {env.run_id!r} (this peer is in run {gate.run_id!r})")
        if not 0 <= header.sender < gate.workers or header.sender == gate.index:
            raise Rejected(Code.INVALID_ARGUMENT, f"unknown sender index {header.sender}: the run's nodes are "
                                                  f"0..{gate.workers - 1} and this peer is node {gate.index}")
        if env.round != header.step // gate.gossip_steps:
            raise Rejected(Code.INVALID_ARGUMENT, f"gossip step {header.step} belongs to round "
                                                  f"{header.step // gate.gossip_steps}, the header says {env.round}")
        if header.step >= gate.total_steps:
            raise Rejected(Code.FAILED_PRECONDITION, f"gossip step {header.step} is past the run's last step "
                                                     f"{gate.total_steps - 1}")
        if header.num_entries != len(gate.expect.shapes):
            raise Rejected(Code.INVALID_ARGUMENT, f"message declares {header.num_entries} tensors; this peer's "
                                                  f"model has {len(gate.expect.shapes)} (another model?)")
        self.inbox.admit(header.step, header.sender)

    @answered
    def Gossip(self, request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Any:
        gate = self.gate
        if gate is None:  # part of every start (neighbours retry it): not worth a warning
            abort(context, grpc.StatusCode.UNAVAILABLE,
                  f"{NOT_READY}: this peer is still starting (its model is not built yet); retry", logging.INFO)
        with self.slots.hold(), \
                self.watchdog.guard(request_iterator, context, min(gate.idle_s, HEADER_WAIT_S)) as stream:
            counted = CountingIterator(stream)

            def admit(header: m.PeerHeader) -> None:
                self._admit_header(gate, header)
                stream.idle_s = gate.idle_s  # authenticated: it may now pause up to the run's idle limit
                stream.set_deadline(GOSSIP_BASE_S + header.total_bytes / MIN_GOSSIP_RATE)

            try:
                header, entries = serde.read_peer(counted, gate.expect.max_bytes, admit)
                message = PeerMessage(round=header.envelope.round, step=header.step, sender=header.sender,
                                      payloads=entries, weight=header.weight)
                check_message(f"{header.envelope.worker_id} (node {header.sender})", entries, header.weight,
                              gate.expect)
                self.inbox.put(message)  # admitted again: the floor may have moved while the payload streamed
            except BaseException:
                self.count(0, counted.nbytes)
                raise
            ack = serde.to_pb(m.PeerAck(step=header.step, bytes_received=counted.nbytes))
            self.count(ack.ByteSize(), counted.nbytes)
            return ack
