"""`cluster.transport: inproc` for gossip: every node a thread of one process, messages handed over in memory.

`InprocPeers` is the hub of one simulated run: it holds the rendezvous (handed in by whoever builds the
run: the worker package never imports the coordinator) and one `InprocPeerTransport` per node. A send
checks the message on arrival exactly as the p2p service does: the header part (a sender of the run, the
round of the step, the receiver's step window: `PeerInbox`) and the tensor part against the receiver's own
parameters (`peer_check.check_message`). A refused message is never delivered; the sender's handle is
False and the reason is logged and kept in `refusals`. A send to a node that has not started yet waits
for it (up to the run's `peer_timeout_s`): threads start at slightly different times.

Bytes are the payloads' bytes (`PeerMessage.nbytes()`), counted when a message is delivered: sent by the
sender, received by the receiver. Nothing crosses a wire, so no framing is modelled, and a refused
message counts for neither side.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Protocol

from protocols.config import PROTOCOL_VERSION, RunConfig
from protocols.refusals import Code, Rejected
from protocols.replica import Params
from worker.transports.base import Handle
from worker.transports.peer_check import PeerExpectation, check_message, gossip_codecs
from worker.transports.peer_inbox import PeerInbox
from worker.transports.peers import PeerMessage, PeerTransport, Roster

log = logging.getLogger(__name__)


class RendezvousService(Protocol):
    """What the hub calls: `coordinator.rendezvous.Rendezvous`, structurally."""

    def join(self, hostname: str, token: str, protocol_version: int, address: str, worker_name: str = "") -> Any: ...
    def roster(self, worker_id: str, token: str, round_: int) -> Roster: ...
    def report(self, worker_id: str, token: str, round_: int, metrics: dict[str, float]) -> None: ...
    def leave(self, worker_id: str, token: str) -> None: ...
    def attest_base(self, worker_id: str, token: str, digest: str) -> str: ...


class InprocPeers:
    def __init__(self, rendezvous: RendezvousService, cfg: RunConfig) -> None:
        self.rendezvous, self.cfg, self.token = rendezvous, cfg, cfg.cluster.token
        self.codecs = gossip_codecs(cfg)
        self.gossip_steps = int(getattr(cfg.protocol, "gossip_steps", 1))
        self.wait_s = float(getattr(cfg.protocol, "peer_timeout_s", 30.0))
        self.nodes: dict[int, InprocPeerTransport] = {}
        self.refusals: list[str] = []  # why each refused message was refused, in order
        self._cond = threading.Condition()

    def transport(self, name: str = "") -> InprocPeerTransport:
        """Join the rendezvous now (join order is the node index: its shard and its place in the graph)."""
        joined = self.rendezvous.join("inproc", self.token, PROTOCOL_VERSION, "", name)
        node = InprocPeerTransport(self, joined.worker_id, joined.index, self.cfg.cluster.workers, joined.session)
        with self._cond:
            self.nodes[node.index] = node
        return node

    def started(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def deliver(self, to: int, message: PeerMessage) -> None:
        """Check `message` against node `to` and file it in its inbox; `Rejected` saying why if refused."""
        with self._cond:
            ready = self._cond.wait_for(lambda: to in self.nodes and self.nodes[to].expect is not None, self.wait_s)
            node = self.nodes.get(to)
        if node is None or not ready:
            raise Rejected(Code.FAILED_PRECONDITION, f"node {to} did not start within {self.wait_s:g} s")
        node.accept(message)

    def refused(self, reason: str) -> None:
        with self._cond:
            self.refusals.append(reason)


class InprocPeerTransport(PeerTransport):
    def __init__(self, hub: InprocPeers, worker_id: str, index: int, workers: int, session: str = "") -> None:
        self.hub, self.worker_id, self.index, self.workers = hub, worker_id, index, workers
        self.session = session  # what its calls to the rendezvous carry after the join
        self.expect: PeerExpectation | None = None
        self.closed = False
        # Four rounds' worth of steps ahead, as the p2p inbox allows: neighbours are never further apart.
        self.inbox = PeerInbox(4 * hub.gossip_steps)
        self._lock = threading.Lock()  # the counters: senders' threads add to `_received`
        self._sent = self._received = 0

    def start(self, params: Params, base_digest: str = "") -> Roster:
        if base_digest:
            self.hub.rendezvous.attest_base(self.worker_id, self.session, base_digest)
        self.expect = PeerExpectation.of(params, self.hub.codecs)
        self.hub.started()
        return self.roster(0)

    def roster(self, round_: int) -> Roster:
        roster: Roster = self.hub.rendezvous.roster(self.worker_id, self.session, round_)
        return roster

    def accept(self, message: PeerMessage) -> None:
        """Node-side check of an incoming message (called in the sender's thread), then into the inbox."""
        sender = f"node {message.sender}"
        if self.closed:
            raise Rejected(Code.FAILED_PRECONDITION, f"node {self.index} has left the run")
        if not 0 <= message.sender < self.workers or message.sender == self.index:
            raise Rejected(Code.INVALID_ARGUMENT, f"unknown sender index {message.sender}: the run's nodes are "
                                                  f"0..{self.workers - 1} and this peer is node {self.index}")
        if message.round != message.step // self.hub.gossip_steps:
            step_round = message.step // self.hub.gossip_steps
            raise Rejected(Code.INVALID_ARGUMENT, f"gossip step {message.step} belongs to round {step_round}, "
                                                  f"{sender} says {message.round}")
        assert self.expect is not None  # deliver waited for start
        self.inbox.admit(message.step, message.sender)
        check_message(sender, message.payloads, message.weight, self.expect)
        self.inbox.put(message)
        with self._lock:
            self._received += message.nbytes()

    def send(self, to: int, message: PeerMessage) -> Handle[bool]:
        try:
            self.hub.deliver(to, message)
        except Rejected as err:
            reason = f"node {self.index} -> node {to}, gossip step {message.step}: {err.message}"
            log.warning("gossip message refused: %s", reason)
            self.hub.refused(reason)
            return Handle.completed(False)
        with self._lock:
            self._sent += message.nbytes()
        return Handle.completed(True)

    def receive(self, step: int, senders: set[int], timeout_s: float) -> dict[int, PeerMessage]:
        return self.inbox.take(step, senders, timeout_s)

    def report(self, round_: int, metrics: dict[str, float]) -> None:
        self.hub.rendezvous.report(self.worker_id, self.session, round_, metrics)

    @property
    def bytes_sent(self) -> int:
        with self._lock:
            return self._sent

    @property
    def bytes_received(self) -> int:
        with self._lock:
            return self._received

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.hub.rendezvous.leave(self.worker_id, self.session)
