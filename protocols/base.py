"""The Protocol interface: the outer algorithm as pure functions over dicts of tensors.

A protocol has a worker half (`make_update`: what to send after local training) and a coordinator
half (`new_round` / `Accumulator.fold` / `aggregate`: how updates become the next global state).
No I/O, no clocks, no threads: transports and the coordinator's state machine call these.

The coordinator folds each update into an `Accumulator` as it arrives, so its memory stays a small
multiple of the model whatever the number of workers; a protocol whose aggregator needs every
update (trimmed mean, median-norm clipping) keeps them in its own accumulator and says so.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from compression.payload import Payload

Params = dict[str, torch.Tensor]


@dataclass
class Update:
    """What one worker sends for one round: one payload per parameter tensor, by name."""

    payloads: dict[str, Payload]
    # How much this update counts in the average (e.g. tokens trained on); 1.0 = equal weight.
    weight: float = 1.0

    def nbytes(self) -> int:
        return sum(p.nbytes() for p in self.payloads.values())


class Accumulator(ABC):
    """Running aggregate of one round's updates."""

    @abstractmethod
    def fold(self, worker_id: str, update: Update) -> None:
        """Add one complete, already validated update."""

    @property
    @abstractmethod
    def count(self) -> int:
        """Number of updates folded so far."""


@dataclass
class MeanAccumulator(Accumulator):
    """Weighted running mean of dense-decoded updates, per tensor."""

    decode: Any  # Callable[[Payload], torch.Tensor]; Any keeps the dataclass picklable
    sums: Params = field(default_factory=dict)
    total_weight: float = 0.0
    workers: list[str] = field(default_factory=list)

    def fold(self, worker_id: str, update: Update) -> None:
        for name, payload in update.payloads.items():
            value = self.decode(payload).to(torch.float32) * update.weight
            if name in self.sums:
                self.sums[name].add_(value)
            else:
                self.sums[name] = value.clone()
        self.total_weight += update.weight
        self.workers.append(worker_id)

    @property
    def count(self) -> int:
        return len(self.workers)

    def mean(self) -> Params:
        if self.total_weight <= 0:
            raise ValueError("no updates were folded into this round")
        return {name: s / self.total_weight for name, s in self.sums.items()}


class Protocol(ABC):
    """An outer training protocol. Subclasses cite their paper in the class docstring."""

    kind: ClassVar[str]

    # ---- worker half -------------------------------------------------------------------------
    def init_worker_state(self, params: Params) -> Any:
        """Per-worker state kept across rounds (error-feedback buffers, ...)."""
        return None

    @abstractmethod
    def make_update(self, local: Params, global_: Params, state: Any) -> tuple[Update, Any]:
        """After local training: the update to send, and the worker's next state."""

    # ---- coordinator half --------------------------------------------------------------------
    def init_server_state(self, global_: Params) -> Any:
        """Coordinator state kept across rounds (outer optimizer momentum, ...)."""
        return None

    @abstractmethod
    def new_round(self, global_: Params) -> Accumulator:
        """An empty accumulator for one round."""

    @abstractmethod
    def aggregate(self, global_: Params, acc: Accumulator, state: Any) -> tuple[Params, Any]:
        """Close the round: the new global parameters and the next server state."""
