"""The Protocol interface: the outer algorithm as pure functions over dicts of tensors.

A protocol has two halves, both free of I/O, clocks and threads:

- worker half: `make_update(local, replica, state)` (what to send after local training) and
  `apply(update, replica)` (the outer step every replica takes with the round's aggregate update);
- aggregator half: `uplink_codec`, `uplink_names` and the replica's shapes and dtypes (what a valid update
  looks like: `protocols.check.expectation`), `new_round` + `Accumulator.fold` (checked updates folded as they
  arrive) and `close(acc, state)` (the round's aggregate update).

`protocols/round.py` runs the aggregator half for the coordinator, the all-gather ranks and the in-process
transport alike, and puts the downlink (`protocols/downlink.py`) between `close` and `apply`.

The accumulator folds each checked update as it arrives, so its memory stays a small multiple of the model
whatever the number of workers; a protocol whose aggregator needs every update (a median, per-worker
shifts) keeps them in its own accumulator and says so in its docstring.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, Literal, TypeVar

import torch

from compression.payload import Payload
from protocols.replica import Params, Replica
from protocols.settings import ProtocolSettings

WorkerState = TypeVar("WorkerState")
AggregatorState = TypeVar("AggregatorState")


@dataclass
class Update:
    """What one worker sends for one round: one payload per parameter tensor, by name."""

    payloads: dict[str, Payload]
    # How much this update counts in the average (e.g. tokens trained on); 1.0 = equal weight.
    weight: float = 1.0
    # Digest of the replica it was computed against (`Replica.digest`): the star's coordinator refuses an update
    # whose base is not the state its round started from. Empty: not stated (not judged).
    base: str = ""

    def nbytes(self) -> int:
        return sum(p.nbytes() for p in self.payloads.values())


@dataclass(frozen=True)
class Aggregate:
    """What every replica applies once round `round` closed: the one message the coordinator broadcasts.

    Either `payloads` (the aggregate update, per tensor, as the downlink encoded it) or `relayed` (the
    senders' own updates in the order the aggregator folded them, which each replica folds again).
    """

    round: int
    payloads: dict[str, Payload] = field(default_factory=dict)
    relayed: tuple[Update, ...] = ()

    def nbytes(self) -> int:
        return sum(p.nbytes() for p in self.payloads.values()) + sum(u.nbytes() for u in self.relayed)


@dataclass(frozen=True)
class Decoded:
    """One tensor of a checked update, decoded exactly as the accumulator folds it.

    indices: flat int64 [k] coordinates when the view is "coordinates" (checked in range, unique), else None.
    values:  float32 [k] at `indices`, or the dense tensor [shape] in the payload's dtype.
    """

    shape: tuple[int, ...]
    values: torch.Tensor
    indices: torch.Tensor | None = None


@dataclass(frozen=True)
class CheckedUpdate:
    """An update that passed `protocols.round.check_update`: every tensor decoded, nothing left to fail."""

    tensors: dict[str, Decoded]
    weight: float
    raw: Update  # kept for a relayed downlink
    # With the "coordinates" view, where the check found it: the permutation that sorts every tensor's indices
    # laid end to end (each tensor's offset by the elements of those before it, in `tensors` order), for an
    # accumulator that folds coordinates in sorted order not to sort them again.
    order: torch.Tensor | None = None


View = Literal["dense", "coordinates"]


class Accumulator(ABC):
    """Running aggregate of one round's checked updates."""

    # How `check_update` must decode payloads for this accumulator: dense tensors or (indices, values).
    view: ClassVar[View] = "dense"

    @abstractmethod
    def fold(self, worker_id: str, update: CheckedUpdate) -> None:
        """Add one complete, checked update (it cannot fail half-way: everything was decoded)."""

    @property
    @abstractmethod
    def count(self) -> int:
        """Number of updates folded so far."""


@dataclass
class MeanAccumulator(Accumulator):
    """Weighted running mean of dense-decoded updates, per tensor."""

    sums: Params = field(default_factory=dict)
    total_weight: float = 0.0
    workers: list[str] = field(default_factory=list)

    def fold(self, worker_id: str, update: CheckedUpdate) -> None:
        for name, decoded in update.tensors.items():
            value = decoded.values.to(torch.float32) * update.weight
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


class Protocol(ABC, Generic[WorkerState, AggregatorState]):
    """An outer training protocol. Subclasses cite their paper in the class docstring and name their
    config section in `settings`; that registers them under the section's `kind`."""

    registry: ClassVar[dict[str, type[Protocol[Any, Any]]]] = {}
    settings: ClassVar[type[ProtocolSettings]]
    kind: ClassVar[str]
    # The downlink a recipe's `downlink.codec: auto` means: "none" (dense) or "sparse".
    default_downlink: ClassVar[str] = "none"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        settings = cls.__dict__.get("settings")
        if settings is not None:
            cls.kind = settings.model_fields["kind"].default
            Protocol.registry[cls.kind] = cls

    @classmethod
    @abstractmethod
    def from_settings(cls, settings: Any) -> Protocol[WorkerState, AggregatorState]:
        """Build from the `protocol` section of a run config."""

    # ---- worker half -------------------------------------------------------------------------
    @abstractmethod
    def init_worker_state(self, params: Params) -> WorkerState:
        """Per-worker state kept across rounds (error-feedback buffers, ...)."""

    @abstractmethod
    def make_update(self, local: Params, replica: Params, state: WorkerState) -> tuple[Update, WorkerState]:
        """After local training from `replica`: the update to send, and the worker's next state."""

    @abstractmethod
    def apply(self, update: Mapping[str, torch.Tensor], replica: Replica) -> Replica:
        """The outer step every replica takes with the round's (decoded) aggregate update."""

    def apply_in_place(self, update: Mapping[str, torch.Tensor], replica: Replica) -> Replica | None:
        """`apply`'s replica, bit for bit, stepped in `replica`'s own tensors (the caller holds them alone), or
        None where this protocol has no such step (the caller then uses `apply`). Everything that can refuse the
        update is checked before a tensor changes. For the coordinator's close (protocols/round.py)."""
        return None

    # ---- aggregator half ---------------------------------------------------------------------
    @property
    @abstractmethod
    def uplink_codec(self) -> str:
        """The codec every update's payloads must carry (the run's configured uplink codec)."""

    @abstractmethod
    def init_aggregator_state(self, replica: Replica) -> AggregatorState:
        """Aggregator state kept across rounds beyond the replica (per-worker shifts, ...)."""

    @abstractmethod
    def new_round(self) -> Accumulator:
        """An empty accumulator for one round."""

    @abstractmethod
    def close(self, acc: Accumulator, state: AggregatorState) -> tuple[Mapping[str, torch.Tensor], AggregatorState]:
        """The round's aggregate update (what `apply` steps with) and the next aggregator state."""

    @property
    def overlapped(self) -> bool:
        """Whether the round loop overlaps each round's exchange with the next round's training (CO2)."""
        return False

    @property
    def merges_on_arrival(self) -> bool:
        """Whether the round loop overlaps each round's exchange with the next round's first inner steps and
        applies the (synchronous) aggregate when it arrives (`overlap.mode: on_arrival`: protocols/arrival.py,
        worker/loop.py `_run_on_arrival`)."""
        return False

    @property
    def arrival_delay_steps(self) -> int | None:
        """On arrival: merge after exactly this many inner steps (None: after the step the aggregate arrived in)."""
        return None

    def withdraw(self, update: Update, state: WorkerState) -> WorkerState:
        """The worker state after `update` (made from `state`'s successor) was refused: what the error
        feedback had counted as delivered goes back into it. Stateless protocols: `state` unchanged."""
        return state

    @property
    def eager(self) -> bool:
        """Whether an overlapped worker starts its inner steps from `eager_start` (Kale et al.'s eager)."""
        return False

    def eager_start(self, params: Params, fresh: Update, stale: Update | None, workers: int) -> Params:
        """Where a worker starts its next inner steps given its last two updates (eager protocols only)."""
        raise NotImplementedError(f"{type(self).__name__} has no eager variant")

    @property
    def relayable(self) -> bool:
        """Whether `close` depends on the folded updates alone, so replicas can refold relayed updates."""
        return False

    def uplink_names(self, names: frozenset[str]) -> frozenset[str]:
        """Which of the replica's tensors `names` every update carries (`protocols.check.expectation`): all
        of them by default. A protocol that keeps some tensors frozen on the clients (FFA-LoRA, FedSVD: the
        LoRA `A` factors) names only what trains; an update that carries another is refused, and the
        aggregate may still cover every tensor."""
        return names
