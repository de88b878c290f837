"""Shared by the fuzz tests: protobuf messages made of random bytes, valid messages with bytes flipped, and the
servicer context that records how a call fed in process ended."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import grpc


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


class Ended(Exception):
    """The servicer ended the call (context.abort)."""


class RecordingContext:  # for the synchronous servicers (rendezvous, peers)
    """The part of grpc.ServicerContext the servicer uses: abort records the status and ends the call."""

    def __init__(self) -> None:
        self.code: grpc.StatusCode | None = None
        self.details = ""
        self.callbacks: list[Callable[[], None]] = []

    def add_callback(self, callback: Callable[[], None]) -> bool:
        self.callbacks.append(callback)
        return True

    def terminate(self) -> None:
        """What gRPC does when the call ends, however it ends: run its callbacks."""
        for callback in self.callbacks:
            callback()

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.code, self.details = code, details
        raise Ended(details)

    def is_active(self) -> bool:
        return True

    def cancel(self) -> None:
        raise AssertionError("nothing in this test stalls: the watchdog must not cancel")
