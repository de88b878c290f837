"""Jittered exponential backoff between a client's retries of a call, shared by every client of lowband's servers
(the coordinator's, the rendezvous', a gossip peer's).

Each wait is drawn from [0.5, 1.5) x the current delay, which starts at `first_s` and doubles after every wait up
to `cap_s`: many workers refused together (a restarted coordinator, a busy one) then come back spread out instead
of together. When to stop retrying is each caller's own rule."""

from __future__ import annotations

import random
import time


class Backoff:
    def __init__(self, first_s: float = 0.1, cap_s: float = 5.0) -> None:
        self.delay, self.cap_s = first_s, cap_s

    def wait(self) -> None:
        time.sleep(self.delay * (0.5 + random.random()))
        self.delay = min(self.delay * 2, self.cap_s)
