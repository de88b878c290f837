"""Shared by the fuzz tests: protobuf messages made of random bytes, and valid messages with bytes flipped."""

from __future__ import annotations

import random
from typing import Any


def random_message(rng: random.Random, cls: Any) -> Any | None:
    """A message of `cls` parsed from up to 80 random bytes, or None when they do not parse."""
    try:
        return cls.FromString(rng.randbytes(rng.randrange(0, 80)))
    except Exception:  # DecodeError and friends: gRPC itself refuses what does not deserialize
        return None


def mutated(rng: random.Random, message: Any) -> Any | None:
    """`message` with 1 to 3 of its serialized bytes replaced at random, or None when that no longer parses."""
    data = bytearray(message.SerializeToString())
    for _ in range(rng.randrange(1, 4)):
        if data:
            data[rng.randrange(len(data))] = rng.randrange(256)
    try:
        return type(message).FromString(bytes(data))
    except Exception:
        return None
