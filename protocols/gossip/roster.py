"""`Roster`: the rendezvous' answer for a round, shared by the coordinator side (`coordinator/rendezvous.py`)
and the peer transports (`worker/transports/peers.py` re-exports it). It lives here, not in `worker/`,
because the coordinator and the worker never import each other; it is plain data, no tensors."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Roster:
    """The rendezvous' answer for a round: the run's size, whether it is over, and where peers listen
    (node index -> address; empty for in-process peers)."""

    round: int
    workers: int
    finished: bool
    addresses: dict[int, str] = field(default_factory=dict)
