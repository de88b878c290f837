"""A gossip node's inbox: checked messages keyed by (step, sender), and the step window they must fall in.

The Peer service's handler threads put messages in; the round loop's `receive(step, senders, timeout)` takes
them out, waiting on a condition variable, so a neighbour's message that arrives before its receiver asked
for it (a faster neighbour) is kept, and one that never arrives blocks the receiver for the timeout only.

The window: `floor` is the oldest step still accepted. Taking step s moves the floor to s + 1 (what arrives
for s later was too late to be mixed: refused as stale, so its sender learns it, rather than stored and
silently dropped), and drops anything older. A step more than `max_ahead` past the floor is refused too: a
runaway or confused sender cannot fill this node's memory with models it will not need for a long time.
Every refusal is a `Rejected` whose message names the step and the window.
"""

from __future__ import annotations

import threading
import time

from protocols.refusals import Code, Rejected
from worker.transports.peers import PeerMessage


class PeerInbox:
    def __init__(self, max_ahead: int) -> None:
        if max_ahead < 0:
            raise ValueError(f"max_ahead must be >= 0, got {max_ahead}")
        self.max_ahead = max_ahead
        self.floor = 0
        self._messages: dict[tuple[int, int], PeerMessage] = {}
        self._cond = threading.Condition()

    def _admit(self, step: int, sender: int) -> None:
        if step < self.floor:
            raise Rejected(
                Code.FAILED_PRECONDITION,
                f"stale step: message from node {sender} is for gossip step {step}, this node is at step {self.floor}",
            )
        if step > self.floor + self.max_ahead:
            raise Rejected(
                Code.FAILED_PRECONDITION,
                f"step too far ahead: message from node {sender} is for gossip step {step}, this node accepts steps "
                f"{self.floor}..{self.floor + self.max_ahead}",
            )
        if (step, sender) in self._messages:
            raise Rejected(Code.ALREADY_EXISTS, f"node {sender} already sent its message for gossip step {step}")

    def admit(self, step: int, sender: int) -> None:
        """Refuse, from the header alone, a message this inbox would not take (before its payload is read)."""
        with self._cond:
            self._admit(step, sender)

    def put(self, message: PeerMessage) -> None:
        """File a checked message (admitted again: the floor may have moved while its payload streamed)."""
        with self._cond:
            self._admit(message.step, message.sender)
            self._messages[(message.step, message.sender)] = message
            self._cond.notify_all()

    def _advance(self, floor: int) -> None:
        self.floor = max(self.floor, floor)
        for key in [key for key in self._messages if key[0] < self.floor]:
            del self._messages[key]

    def take(self, step: int, senders: set[int], timeout_s: float) -> dict[int, PeerMessage]:
        """The messages of `step` from `senders` that arrived within `timeout_s` (by sender); the floor then
        moves past `step`."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            self._advance(step)
            while True:
                waiting = [s for s in senders if (step, s) not in self._messages]
                left = deadline - time.monotonic()
                if not waiting or left <= 0:
                    break
                self._cond.wait(left)
            got = {s: self._messages[(step, s)] for s in senders if (step, s) in self._messages}
            self._advance(step + 1)
            return got

    def pending(self) -> list[tuple[int, int]]:
        """(step, sender) of every message waiting to be taken, sorted (for tests and logs)."""
        with self._cond:
            return sorted(self._messages)
