"""The seam between the gossip round loop and whatever carries messages between peers: `PeerTransport`.

Gossip has no aggregator (protocols/gossip): each worker sends its model, or CHOCO's compressed delta, to
its out-neighbours and mixes what its in-neighbours sent. The coordinator only does rendezvous: who is in
the run, where each peer listens, which round it is (`coordinator/rendezvous.py`); it never sees a
tensor. Two transports implement this seam: `p2p` (each worker serves the gRPC `Peer` service and dials its
neighbours, worker/transports/p2p.py) and `inproc` (every node a thread of one process, for simulating
16-64 nodes, worker/transports/peers_inproc.py).

A receiver checks every message against its own model (names, shapes, dtypes, the run's codec, finite
values) and the step it expects; a bad one is refused with a clear error and never mixed. A neighbour
whose message does not arrive within the timeout is left out of that step: `receive` returns what came,
and the loop renormalizes the mixing weights over it, so one vanished peer blocks nobody for longer than
the timeout.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from compression.payload import Payload
from protocols.gossip.roster import Roster
from protocols.replica import Params
from worker.transports.base import Handle

# Roster moved to protocols/gossip/roster.py (the coordinator's Rendezvous returns it, and the coordinator
# never imports worker/); it is re-exported here, so `from worker.transports.peers import Roster` still works.
__all__ = ["PeerMessage", "PeerTransport", "Roster"]


@dataclass(frozen=True)
class PeerMessage:
    """What node `sender` sends one neighbour at gossip step `step` (= round * gossip_steps + q).

    payloads: per tensor name, the sender's parameters (dense: plain averaging, push-sum's mass) or its
    compressed delta (CHOCO's q). weight: push-sum's mass share sent along (1.0 for the other schemes).
    """

    round: int
    step: int
    sender: int
    payloads: dict[str, Payload]
    weight: float = 1.0

    def nbytes(self) -> int:
        return sum(p.nbytes() for p in self.payloads.values())


class PeerTransport(ABC):
    """One node's view of the peers. Byte counters count every message both ways, as sent on the wire."""

    index: int  # this node's index in [0, workers)
    workers: int

    @abstractmethod
    def start(self, params: Params, base_digest: str = "") -> Roster:
        """Join the rendezvous (and start serving); `params` fix what a valid incoming message looks like.
        `base_digest`: of the frozen base under adapters, attested first ("" when every weight trains)."""

    @abstractmethod
    def roster(self, round_: int) -> Roster:
        """Tell the rendezvous this node reached `round_`; the roster for it."""

    @abstractmethod
    def send(self, to: int, message: PeerMessage) -> Handle[bool]:
        """Send `message` to node `to` in the background; the handle's value says whether it was taken
        (False: the peer was gone or refused it; the reason is logged)."""

    @abstractmethod
    def receive(self, step: int, senders: set[int], timeout_s: float) -> dict[int, PeerMessage]:
        """The messages of gossip step `step` from `senders` that arrived within `timeout_s` (by sender).
        Afterwards step `step` is closed for this node: a message for it (or an earlier step) that comes
        later is refused as stale (worker/transports/peer_check.py, shared by both transports)."""

    @abstractmethod
    def report(self, round_: int, metrics: dict[str, float]) -> None:
        """Round `round_`'s metrics (losses, the consensus sketch, cumulative bytes and tokens) to the
        rendezvous, for metrics.jsonl (`coordinator.rendezvous.Rendezvous.report` says which keys).
        `round_` == the run's round count is the final report: the final eval loss and counters."""

    @property
    @abstractmethod
    def bytes_sent(self) -> int: ...

    @property
    @abstractmethod
    def bytes_received(self) -> int: ...

    @abstractmethod
    def close(self) -> None:
        """Leave the rendezvous and stop serving."""
