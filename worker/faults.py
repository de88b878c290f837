"""Fault and straggler injection for experiments and tests: slow steps, a crash at a given step, a
replica corrupted after a given round (the worker must notice by the digest and resync).

A straggler (`slowdown` f > 1, from the run's `faults.stragglers`, protocols/faults_config.py) sleeps
`(f - 1)` times each inner step's measured duration after it, so it runs f times slower than its machine
lets it, whatever that machine's speed and load."""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass, replace

import torch

from compression.payload import dense, dense_values
from protocols.base import Update
from protocols.replica import Replica


@dataclass(frozen=True)
class Faults:
    step_delay_s: float = 0.0  # added to every inner step: simulates a slower machine
    crash_at_step: int = -1  # SIGKILL this process when the inner step counter reaches this value
    corrupt_replica_at_round: int = -1  # after applying this round's aggregate, flip one parameter's value
    # > 0: every update this worker sends is Gaussian noise of this many times its own norm (a broken or
    # malicious worker; dense updates only), to try robust aggregation against.
    garbage_scale: float = 0.0
    slowdown: float = 1.0  # >= 1: every inner step takes this many times its real duration (see above)

    def after_step(self, measured_s: float) -> None:
        """Stretch a step that took `measured_s` seconds to `slowdown` times that."""
        if self.slowdown > 1.0 and measured_s > 0:
            time.sleep((self.slowdown - 1.0) * measured_s)

    def before_step(self, step: int) -> None:
        if self.crash_at_step >= 0 and step >= self.crash_at_step:
            os.kill(os.getpid(), signal.SIGKILL)
        if self.step_delay_s > 0:
            time.sleep(self.step_delay_s)

    def corrupt_update(self, update: Update) -> Update:
        """The update this worker really sends: its own, or scaled garbage (`garbage_scale`)."""
        if self.garbage_scale <= 0:
            return update
        payloads = {}
        for name, payload in update.payloads.items():
            if payload.codec != "dense":
                raise ValueError(f"faults.garbage_scale corrupts dense updates only; {name!r} is {payload.codec!r}")
            value = dense_values(payload)
            noise = torch.randn_like(value)
            payloads[name] = dense(noise * (self.garbage_scale * value.norm() / noise.norm().clamp_min(1e-30)))
        return replace(update, payloads=payloads)

    def after_apply(self, replica: Replica) -> Replica:
        """The replica, corrupted once if this is the round to corrupt (a new dict; nothing shared is touched)."""
        if replica.round - 1 != self.corrupt_replica_at_round or not replica.params:
            return replica
        name = sorted(replica.params)[0]
        params = dict(replica.params)
        params[name] = params[name].clone()
        params[name].view(-1)[0] += 1.0
        return replace(replica, params=params)
