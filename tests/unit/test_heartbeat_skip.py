"""The gRPC transport's heartbeat thread (through `CoordinatorClient.beat`) skips a beat while the client has a
call open that the coordinator counts as proof of life, unless it has a new step or loss to say; with no call
open it beats every interval."""

from __future__ import annotations

import time

from protocols.wire import messages as m
from tests.integration.procs import wait_for
from worker.client import CoordinatorClient
from worker.transports.grpc import _Heartbeat

INTERVAL_S = 0.01


class Client(CoordinatorClient):
    """A CoordinatorClient whose heartbeat calls are recorded instead of sent, and whose open calls the test sets."""

    def __init__(self) -> None:
        super().__init__("127.0.0.1:1")  # never dialled: a channel connects on its first call
        self.beats: list[tuple[int, float | None]] = []

    def calls_open(self, n: int) -> None:
        self._open_calls = n

    def heartbeat(self, step: int, loss: float | None, eval_loss: float | None, retry: bool = True) -> m.HeartbeatReply:
        self.beats.append((step, loss))
        return m.HeartbeatReply(round=0, phase=m.Phase.TRAINING)


def _beats_over(client: Client, seconds: float) -> list[tuple[int, float | None]]:
    before = len(client.beats)
    time.sleep(seconds)
    return client.beats[before:]


def _keeps_beating(client: Client) -> None:
    more = len(client.beats) + 5
    wait_for(lambda: len(client.beats) >= more, 30, "five more beats")


def test_beats_are_skipped_only_while_a_call_is_open_and_nothing_changed() -> None:
    client = Client()
    beat = _Heartbeat(client, INTERVAL_S)
    beat.start()
    try:
        _keeps_beating(client)  # no call open: every interval
        client.calls_open(1)
        time.sleep(20 * INTERVAL_S)  # a beat already under way lands
        assert _beats_over(client, 50 * INTERVAL_S) == []
        beat.step, beat.loss = 7, 1.5
        wait_for(lambda: client.beats[-1] == (7, 1.5), 30, "the news to be said")
        assert _beats_over(client, 50 * INTERVAL_S) == []  # said once, then the open call speaks again
        client.calls_open(0)
        _keeps_beating(client)
    finally:
        beat.stop.set()
        beat.join(5)
        client.close()
