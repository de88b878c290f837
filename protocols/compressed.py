"""The skeleton shared by every protocol that averages (compressed) pseudo-gradients: DiLoCo,
SparseLoCo and EControl.

`Compression` is a picklable description of a `compression:` config block. It builds the worker's
`ErrorFeedback` (kept as the worker state, so its buffers persist across rounds) and tells the aggregator
whether it must keep the workers' shifts (ef21 / econtrol: the update used is the mean of the h_i).

`AveragingProtocol`: the worker sends `replica - local` through its error feedback; the aggregator
averages the decoded messages (ef21 / econtrol: adds each worker's message to that worker's shift h_i and
takes the mean of all h_i, so a worker that missed a round leaves no lasting bias); every replica takes one
outer (Nesterov) SGD step with the result. With codec "none" and error feedback "none" it is exactly dense
DiLoCo.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from pydantic import Field, PositiveFloat, PositiveInt

from compression import registry
from compression.error_feedback import ErrorFeedback
from compression.payload import dense
from protocols.base import Accumulator, CheckedUpdate, MeanAccumulator, Protocol, Update
from protocols.co2_kernels import co2_outer_step, eager_start
from protocols.outer import nesterov_sgd
from protocols.replica import Params, Replica
from protocols.robust import RobustAccumulator
from protocols.settings import CompressionConfig, DownlinkConfig, OverlapConfig, ProtocolSettings, RobustConfig

# Config fields that are codec parameters (the rest describe error feedback).
CODEC_FIELDS = ("density", "chunk", "rank", "seed", "value_dtype", "range_sigmas")


class AveragingSettings(ProtocolSettings):
    """Fields every averaging protocol's `protocol:` section has (each subclass sets its paper's defaults)."""

    inner_steps: PositiveInt = 50  # H
    outer_lr: PositiveFloat = 0.7
    outer_momentum: float = Field(0.9, ge=0.0, lt=1.0)
    compression: CompressionConfig = CompressionConfig()
    downlink: DownlinkConfig = DownlinkConfig()
    overlap: OverlapConfig = OverlapConfig()
    robust: RobustConfig = RobustConfig()
    # Dynamic local updates (protocols/local_updates.py): each worker runs as many of the `inner_steps` as fit
    # in the round's target time at its own measured speed, and updates are averaged weighted by tokens.
    adaptive_inner_steps: bool = False


@dataclass(frozen=True)
class Compression:
    """Codec + error feedback, as plain values (the compressor itself is built per worker)."""

    codec: str = "none"
    error_feedback: str = "none"
    eta: float = 1.0
    decay: float = 1.0
    params: dict[str, Any] = field(default_factory=dict)  # codec parameters, see compression.registry.build

    def __post_init__(self) -> None:
        self.new_feedback()  # fail at construction (unknown codec, bad eta, ...), not on the first round

    @classmethod
    def from_config(cls, cfg: CompressionConfig, where: str = "compression") -> Compression:
        """From a config block; an unset `eta` is the codec's contraction delta (EControl's regime)."""
        params = {name: getattr(cfg, name) for name in CODEC_FIELDS}
        eta = cfg.eta
        if eta is None:
            eta = registry.contraction(cfg.codec, **params) if cfg.error_feedback == "econtrol" else 1.0
            if eta is None:
                raise ValueError(
                    f"{where}.eta: codec {cfg.codec!r} has no closed-form contraction delta to derive EControl's "
                    f"eta from; set {where}.eta (of the order of the codec's delta)"
                )
        return cls(codec=cfg.codec, error_feedback=cfg.error_feedback, eta=eta, decay=cfg.decay, params=params)

    @property
    def wire_codec(self) -> str:
        """The codec name payloads carry ("none" travels as "dense")."""
        return registry.ALIASES.get(self.codec, self.codec)

    @property
    def is_identity(self) -> bool:
        """Dense payloads and no feedback: the protocol runs exactly as its uncompressed paper."""
        return self.wire_codec == "dense" and self.error_feedback == "none"

    @property
    def keeps_shift(self) -> bool:
        """Whether the receiver must keep the shifts h (ef21, econtrol)."""
        return self.error_feedback in ("ef21", "econtrol")

    def new_feedback(self) -> ErrorFeedback:
        compressor = registry.build(self.codec, **self.params)
        return ErrorFeedback(compressor, self.error_feedback, eta=self.eta, decay=self.decay)


NO_COMPRESSION = Compression()


def pseudo_gradient(local: Params, global_: Params) -> Params:
    """`global_ - local` for every tensor the worker trained (local's names), checked against global_."""
    out: Params = {}
    for name, theta_local in local.items():
        theta_global = global_.get(name)
        if theta_global is None:
            raise ValueError(f"local tensor {name!r} is not among the global parameters")
        if theta_global.shape != theta_local.shape or theta_global.dtype != theta_local.dtype:
            raise ValueError(
                f"local tensor {name!r} is {theta_local.dtype}{tuple(theta_local.shape)}, "
                f"global is {theta_global.dtype}{tuple(theta_global.shape)}"
            )
        out[name] = theta_global.detach().to(theta_local.device) - theta_local.detach()
    return out


def decoded_update(update: Update | None) -> Params:
    """Every tensor of `update` decoded; sparse payloads read together where their codec can
    (`registry.sparse_views`), each then scattered as `SparseCompressor.decompress` does."""
    if update is None:
        return {}
    views = registry.sparse_views(list(update.payloads.values()))
    if views is None:
        return {n: registry.decode(p) for n, p in update.payloads.items()}
    out: Params = {}
    for (name, payload), (indices, values) in zip(update.payloads.items(), views, strict=True):
        dense = torch.zeros(payload.numel, dtype=payload.dtype, device=values.device)
        dense[indices] = values
        out[name] = dense.view(payload.shape)
    return out


@dataclass
class ShiftAccumulator(Accumulator):
    """Keeps every sender's decoded message until the round closes (ef21 / econtrol need each worker's
    own message for its shift h_i): memory grows with the number of senders."""

    messages: dict[str, tuple[float, Params]] = field(default_factory=dict)

    def fold(self, worker_id: str, update: CheckedUpdate) -> None:
        self.messages[worker_id] = (update.weight, {n: d.values.to(torch.float32) for n, d in update.tensors.items()})

    @property
    def count(self) -> int:
        return len(self.messages)


@dataclass(frozen=True)
class WorkerShifts:
    """The aggregator's copy of every worker's shift h_i (what that worker's error feedback holds) and
    the weight of its latest update."""

    shifts: dict[str, Params] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)

    def advanced(self, messages: dict[str, tuple[float, Params]]) -> WorkerShifts:
        """h_i <- h_i + D(d_i) for every sender; absent workers keep theirs. Inputs are not modified."""
        shifts, weights = dict(self.shifts), dict(self.weights)
        for worker, (weight, message) in messages.items():
            old = shifts.get(worker, {})
            shifts[worker] = {n: (old[n] + m if n in old else m.clone()) for n, m in message.items()}
            shifts[worker].update({n: h for n, h in old.items() if n not in message})
            weights[worker] = weight
        return WorkerShifts(shifts, weights)

    def mean(self) -> Params:
        """Weighted mean of every known worker's h_i (workers in a fixed order, so it is reproducible)."""
        total = sum(self.weights.values())
        sums: Params = {}
        for worker in sorted(self.shifts):
            for name, h in self.shifts[worker].items():
                value = h * self.weights[worker]
                if name in sums:
                    sums[name].add_(value)
                else:
                    sums[name] = value.clone()
        return {name: s / total for name, s in sums.items()}


class AveragingProtocol(Protocol[ErrorFeedback | None, WorkerShifts | None]):
    """Workers send (compressed) `replica - local`; the aggregator averages; replicas step outer SGD."""

    def __init__(
        self,
        outer_lr: float,
        outer_momentum: float,
        nesterov: bool,
        compression: Compression = NO_COMPRESSION,
        overlap: OverlapConfig | None = None,
        robust: RobustConfig | None = None,
    ) -> None:
        name = type(self).__name__
        if outer_lr <= 0.0:
            raise ValueError(f"{name} outer_lr must be > 0, got {outer_lr}")
        if not 0.0 <= outer_momentum < 1.0:
            raise ValueError(f"{name} outer_momentum must be in [0, 1), got {outer_momentum}")
        self.outer_lr = outer_lr
        self.outer_momentum = outer_momentum
        self.nesterov = nesterov
        self.compression = compression
        self.overlap = overlap or OverlapConfig()
        self.robust = robust or RobustConfig()
        if self.robust.kind != "none" and compression.keeps_shift:
            raise ValueError(f"{name} robust.kind {self.robust.kind!r} needs an aggregate that averages the sent "
                             f"messages; with compression.shift the aggregate averages every worker's shift")
        if self.overlap.eager and not self.overlap.co2:
            raise ValueError(f"{name} overlap.eager needs overlap.enabled: eager is a variant of the overlapped step")
        if self.overlap.eager and compression.keeps_shift:
            raise ValueError(f"{name} overlap.eager needs an aggregate that averages the sent messages; with "
                             f"compression.shift the aggregate averages every worker's shift instead")

    # ---- worker half -------------------------------------------------------------------------
    def init_worker_state(self, params: Params) -> ErrorFeedback | None:
        """The worker's error feedback (its buffers live across rounds); None when nothing is compressed."""
        return None if self.compression.is_identity else self.compression.new_feedback()

    def make_update(self, local: Params, replica: Params, state: ErrorFeedback | None
                    ) -> tuple[Update, ErrorFeedback | None]:
        """Send `replica - local` for every tensor in `local`, through the error feedback if any.

        Without compression the worker state passes through unchanged; with it, `state` must be the
        `ErrorFeedback` from `init_worker_state` and is updated in place (and returned).
        """
        deltas = pseudo_gradient(local, replica)
        if self.compression.is_identity:
            return Update(payloads={n: dense(d) for n, d in deltas.items()}), state
        if not isinstance(state, ErrorFeedback):
            raise TypeError(
                f"{type(self).__name__} worker state must be the ErrorFeedback from init_worker_state, "
                f"got {type(state).__name__}"
            )
        return Update(payloads=state.step_all(deltas)), state

    def withdraw(self, update: Update, state: ErrorFeedback | None) -> ErrorFeedback | None:
        """A refused update's messages go back into the error feedback (`ErrorFeedback.unsend`), in place."""
        if isinstance(state, ErrorFeedback):
            for name, payload in update.payloads.items():
                state.unsend(name, payload)
        return state

    @property
    def overlapped(self) -> bool:
        return self.overlap.co2

    @property
    def merges_on_arrival(self) -> bool:
        return self.overlap.on_arrival

    @property
    def arrival_delay_steps(self) -> int | None:
        return self.overlap.delay_steps

    @property
    def eager(self) -> bool:
        return self.overlap.eager

    def eager_start(self, params: Params, fresh: Update, stale: Update | None, workers: int) -> Params:
        """Eager's starting point for a worker's next inner steps (protocols/co2_kernels.py `eager_start`),
        from the updates it sent: what the aggregate averaged of it, decoded."""
        proxy = self.overlap.eager_proxy
        own_stale = {} if proxy == "update" else decoded_update(stale)  # "update" does not use the stale one
        return eager_start(params, decoded_update(fresh), own_stale, workers, self.outer_lr, proxy)

    def apply(self, update: Mapping[str, torch.Tensor], replica: Replica) -> Replica:
        """One outer (Nesterov) SGD step; tensors without an update keep their value and momentum.

        Overlapped (CO2): the update is one round stale, so the step is CO2's (protocols/co2_kernels.py),
        heavy-ball with the staleness-gap penalty and clipped momentum. The point the stale average was
        taken against is the replica one outer step ago, theta + lr * m (m: the momentum that step applied),
        so the gap needs no extra state in the replica.
        """
        if self.overlap.co2:
            stale_points = {n: torch.add(p, replica.momentum[n], alpha=self.outer_lr) if n in replica.momentum
                            else p for n, p in replica.params.items()}  # fmt: skip
            params, momentum, _ = co2_outer_step(
                replica.params, stale_points, update, replica.momentum, lr=self.outer_lr, beta=self.outer_momentum,
                clip=self.overlap.clip, penalty=self.overlap.penalty,
            )
        else:
            params, momentum = nesterov_sgd(
                replica.params, update, replica.momentum, lr=self.outer_lr, momentum=self.outer_momentum,
                nesterov=self.nesterov,
            )
        return replace(replica, round=replica.round + 1, params=params, momentum=momentum,
                       outer_steps=replica.outer_steps + 1)

    def apply_in_place(self, update: Mapping[str, torch.Tensor], replica: Replica) -> Replica | None:
        """`apply`'s outer SGD step in the replica's tensors (outer.py `nesterov_sgd(in_place=True)`); None for CO2's
        step, and for a subclass with its own `apply`."""
        if self.overlap.co2 or type(self).apply is not AveragingProtocol.apply:
            return None
        params, momentum = nesterov_sgd(replica.params, update, replica.momentum, lr=self.outer_lr,
                                        momentum=self.outer_momentum, nesterov=self.nesterov, in_place=True)
        return replace(replica, round=replica.round + 1, params=params, momentum=momentum,
                       outer_steps=replica.outer_steps + 1)

    # ---- aggregator half ---------------------------------------------------------------------
    @property
    def uplink_codec(self) -> str:
        return self.compression.wire_codec

    def init_aggregator_state(self, replica: Replica) -> WorkerShifts | None:
        return WorkerShifts() if self.compression.keeps_shift else None

    def new_round(self) -> Accumulator:
        if self.compression.keeps_shift:
            return ShiftAccumulator()
        return MeanAccumulator() if self.robust.kind == "none" else RobustAccumulator(self.robust)

    def round_mean(self, acc: Accumulator) -> Mapping[str, torch.Tensor]:
        """The mean decoded message of the round (subclasses with their own accumulator override)."""
        if not isinstance(acc, MeanAccumulator | RobustAccumulator):
            raise TypeError(f"{type(self).__name__} aggregates a MeanAccumulator, got {type(acc).__name__}")
        return acc.mean()

    def close(self, acc: Accumulator, state: WorkerShifts | None
              ) -> tuple[Mapping[str, torch.Tensor], WorkerShifts | None]:
        """The round's update: the mean message, or with shifts the mean of every worker's h_i."""
        if not self.compression.keeps_shift:
            return self.round_mean(acc), state
        if not isinstance(acc, ShiftAccumulator) or not isinstance(state, WorkerShifts):
            raise TypeError(f"{type(self).__name__} with shifts needs a ShiftAccumulator and WorkerShifts")
        if not acc.messages:
            raise ValueError("no updates were folded into this round")
        state = state.advanced(acc.messages)
        return state.mean(), state

    @property
    def relayable(self) -> bool:
        return not self.compression.keeps_shift
