"""Fault and straggler injection for experiments and tests: slow steps, a crash at a given step."""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Faults:
    step_delay_s: float = 0.0  # added to every inner step: simulates a slower machine
    crash_at_step: int = -1  # SIGKILL this process when the inner step counter reaches this value

    def before_step(self, step: int) -> None:
        if self.crash_at_step >= 0 and step >= self.crash_at_step:
            os.kill(os.getpid(), signal.SIGKILL)
        if self.step_delay_s > 0:
            time.sleep(self.step_delay_s)
