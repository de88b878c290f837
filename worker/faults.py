"""Fault and straggler injection for experiments and tests: slow steps, a crash at a given step, a
replica corrupted after a given round (the worker must notice by the digest and resync)."""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass, replace

from protocols.replica import Replica


@dataclass(frozen=True)
class Faults:
    step_delay_s: float = 0.0  # added to every inner step: simulates a slower machine
    crash_at_step: int = -1  # SIGKILL this process when the inner step counter reaches this value
    corrupt_replica_at_round: int = -1  # after applying this round's aggregate, flip one parameter's value

    def before_step(self, step: int) -> None:
        if self.crash_at_step >= 0 and step >= self.crash_at_step:
            os.kill(os.getpid(), signal.SIGKILL)
        if self.step_delay_s > 0:
            time.sleep(self.step_delay_s)

    def after_apply(self, replica: Replica) -> Replica:
        """The replica, corrupted once if this is the round to corrupt (a new dict; nothing shared is touched)."""
        if replica.round - 1 != self.corrupt_replica_at_round or not replica.params:
            return replica
        name = sorted(replica.params)[0]
        params = dict(replica.params)
        params[name] = params[name].clone()
        params[name].view(-1)[0] += 1.0
        return replace(replica, params=params)
