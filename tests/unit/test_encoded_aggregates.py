"""coordinator/servicer.py `EncodedAggregates`: a round's aggregate encoded once; `kept` finds that encoding
without waiting (so later pulls are served on the loop), and only for the very aggregate it was made from."""

from __future__ import annotations

import torch

from compression.payload import dense
from coordinator.servicer import EncodedAggregates
from protocols.base import Aggregate


def aggregate(round_: int, scale: float = 1.0) -> Aggregate:
    return Aggregate(round_, {"w": dense(scale * torch.ones(4, 3))})


def test_kept_finds_an_encoding_only_once_made_and_only_for_its_own_aggregate() -> None:
    encodings = EncodedAggregates(chunk_bytes=1 << 20, keep=2)
    first = aggregate(0)
    assert encodings.kept(first) is None  # nothing encoded yet: the pull goes to `of` on a thread
    made = encodings.of(first)
    assert encodings.kept(first) is made and encodings.of(first) is made and encodings.encoded == 1
    assert encodings.kept(aggregate(0, 2.0)) is None  # the same round closed again (a resumed run): not this one


def test_kept_forgets_rounds_past_the_kept_ones() -> None:
    encodings = EncodedAggregates(chunk_bytes=1 << 20, keep=2)
    rounds = [aggregate(r) for r in range(3)]
    for a in rounds:
        encodings.of(a)
    assert encodings.kept(rounds[0]) is None
    assert encodings.kept(rounds[1]) is not None and encodings.kept(rounds[2]) is not None
