"""A worker's bytes on the wire, split by what they carried, both ways.

- protocol: the round's exchange itself, updates up and aggregates down;
- control: joins, heartbeats, waits, leaves, attestations, pull requests and push replies;
- state: the one-time initial-state upload and whole-replica pulls (join, rejoin, resync).

Every count adds to one kind, so `sent` and `received` (the totals) are always the sum of the three.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

KINDS = ("protocol", "control", "state")


@dataclass
class Traffic:
    protocol_sent: int = 0
    protocol_received: int = 0
    control_sent: int = 0
    control_received: int = 0
    state_sent: int = 0
    state_received: int = 0

    def add(self, kind: str, sent: int = 0, received: int = 0) -> None:
        if kind not in KINDS:
            raise ValueError(f"traffic kind {kind!r} is none of {', '.join(KINDS)}")
        setattr(self, f"{kind}_sent", getattr(self, f"{kind}_sent") + sent)
        setattr(self, f"{kind}_received", getattr(self, f"{kind}_received") + received)

    @property
    def sent(self) -> int:
        return self.protocol_sent + self.control_sent + self.state_sent

    @property
    def received(self) -> int:
        return self.protocol_received + self.control_received + self.state_received

    def as_dict(self) -> dict[str, int]:
        return asdict(self)
