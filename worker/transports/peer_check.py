"""What a gossip receiver accepts, tensor-wise: the check both peer transports run on an incoming message.

The p2p servicer (peer_servicer.py) and the in-process hub (peers_inproc.py) call `check_message` on a
message's payloads once its header passed (sender, round, step window: peer_inbox.py), so both refuse the
same messages with the same words. It is `protocols.check.check_update` (names, shapes, dtypes, the codec,
the payload against its own header, indices in range and unique, finite values, the weight, the size) run
against the receiver's own parameters: a message from a model of another architecture, or with a NaN, is
refused before anything of it is mixed. A gossip message is one codec throughout (what `gossip_codecs`
says the run sends); a message that mixes codecs is refused too.

(Written by the gossip-loop side against the names p2p.py and peer_servicer.py already call:
`gossip_codecs`, `PeerExpectation.of`, `.shapes`, `.max_bytes`, `check_message(sender, payloads, weight,
expect)` raising `Rejected`. Keep them if you change this file.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from compression.payload import Payload
from protocols.base import Update
from protocols.check import DEFAULT_MAX_UPDATE_RATIO, Expectation, UpdateRejected, check_update
from protocols.config import RunConfig
from protocols.refusals import Code, Rejected
from protocols.replica import Params


def gossip_codecs(cfg: RunConfig) -> frozenset[str]:
    """The payload codecs a run's gossip messages use: dense models (average, push-sum's sums) or CHOCO's
    compressed differences."""
    protocol = cfg.protocol
    if getattr(protocol, "scheme", "average") == "choco":
        return frozenset({protocol.choco.compressor().codec})  # type: ignore[attr-defined]
    return frozenset({"dense"})


@dataclass(frozen=True)
class PeerExpectation:
    """What a valid message for this node looks like: its tensors' shapes and dtypes, the run's codecs, and a
    size cap (push-sum's sums and CHOCO's differences travel in float32 even for a half-precision model:
    twice the dense model, plus slack for headers)."""

    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, torch.dtype]
    codecs: frozenset[str]
    max_bytes: int
    max_abs: float = math.inf  # the largest |value| a message may hold

    @classmethod
    def of(cls, params: Params, codecs: frozenset[str],
           max_ratio: float = DEFAULT_MAX_UPDATE_RATIO) -> PeerExpectation:
        """`max_ratio` (the run's cluster.max_update_ratio): no value of a message may exceed it times the
        largest |parameter| of this node's model (at least 1), as the coordinator bounds updates: a finite
        3e38 would otherwise be mixed into the model."""
        dense_bytes = sum(t.numel() * t.element_size() for t in params.values())
        largest = max([1.0, *(float(t.detach().abs().max()) for t in params.values()
                               if t.is_floating_point() and t.numel())])
        return cls({n: tuple(t.shape) for n, t in params.items()}, {n: t.dtype for n, t in params.items()},
                   frozenset(codecs), 2 * dense_bytes + 4096, max_ratio * largest)

    def tensors(self, codec: str) -> Expectation:
        """`protocols.check`'s expectation for a message in `codec`, decoded dense as the mixing uses it."""
        return Expectation(dict(self.shapes), dict(self.dtypes), codec, "dense", self.max_bytes, max_abs=self.max_abs)


def check_message(sender: str, payloads: dict[str, Payload], weight: float, expect: PeerExpectation) -> None:
    """Raise `Rejected` (INVALID_ARGUMENT, naming `sender`, the tensor and what was wrong) for a message this
    node must not mix; return None for one it may."""
    codecs = {p.codec for p in payloads.values()}
    if codecs - expect.codecs:
        raise Rejected(Code.INVALID_ARGUMENT, f"message from {sender} is encoded with {sorted(codecs)}; this run's "
                                              f"gossip messages use {sorted(expect.codecs)}")
    if len(codecs) > 1:
        raise Rejected(Code.INVALID_ARGUMENT, f"message from {sender} mixes codecs {sorted(codecs)}: a gossip "
                                              f"message is one codec throughout")
    codec = next(iter(codecs)) if codecs else min(expect.codecs)
    try:
        check_update(sender, Update(payloads, weight), expect.tensors(codec))
    except UpdateRejected as err:
        raise Rejected(Code.INVALID_ARGUMENT, f"message from {str(err).removeprefix('worker ')}") from None
