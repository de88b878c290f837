"""Compression plumbing shared by every protocol that averages (compressed) pseudo-gradients.

`Compression` is a picklable description of a `compression:` config block. It builds the worker's
`ErrorFeedback` (kept as the worker state, so its buffers persist across rounds) and tells the
coordinator whether it must keep a `Mirror` shift (ef21 / econtrol: the update used is h + mean(d)).

`AveragingProtocol` is the common skeleton of DiLoCo, SparseLoCo and EControl: the worker sends
`global - local` through its error feedback; the coordinator averages the decoded messages, passes
the mean through the mirror and takes one outer (Nesterov) SGD step. With codec "none" and error
feedback "none" it is exactly dense DiLoCo: dense payloads, no worker state, no shift.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from compression import registry
from compression.error_feedback import ErrorFeedback, Mirror
from compression.payload import Payload, dense, dense_values
from protocols.base import Accumulator, MeanAccumulator, Params, Protocol, Update
from protocols.config import CompressionConfig
from protocols.outer import nesterov_sgd

Encode = Callable[[str, torch.Tensor], Payload]
Decode = Callable[[Payload], torch.Tensor]

# Config fields that are codec parameters (the rest describe error feedback).
_CODEC_FIELDS = ("density", "chunk", "rank", "seed", "value_dtype", "range_sigmas")


def dense_encode(name: str, tensor: torch.Tensor) -> Payload:
    """Send the tensor uncompressed (module-level so protocols holding it pickle)."""
    return dense(tensor)


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
    def from_config(cls, cfg: CompressionConfig) -> Compression:
        return cls(
            codec=cfg.codec,
            error_feedback=cfg.error_feedback,
            eta=cfg.eta,
            decay=cfg.decay,
            params={name: getattr(cfg, name) for name in _CODEC_FIELDS},
        )

    @property
    def is_identity(self) -> bool:
        """Dense payloads and no feedback: the protocol runs exactly as its uncompressed paper."""
        return self.codec in ("none", "dense") and self.error_feedback == "none"

    @property
    def keeps_shift(self) -> bool:
        """Whether the receiver must keep the mean shift h (ef21, econtrol)."""
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


def mirror_step(kind: str, shift: Params, mean: Params) -> tuple[Params, Params]:
    """(update to apply, next shift) from the mean decoded message; `shift` is not modified.

    A tensor's shift only moves in rounds where it was sent, and it equals the mean of the workers'
    shifts only while every worker's message reaches every round (a dropped update leaves that
    worker's h ahead of the coordinator's mean; the next rounds do not repair it).
    """
    mirror = Mirror(kind)
    mirror.load_state_dict(dict(shift))  # Mirror.update builds new tensors, so `shift` stays intact
    update = {name: mirror.update(name, m) for name, m in mean.items()}
    return update, mirror.state_dict()


@dataclass
class OuterState:
    """What the coordinator keeps between rounds."""

    # name -> outer momentum buffer [same shape as the parameter], at least float32.
    momentum: Params = field(default_factory=dict)
    # Outer steps applied so far.
    outer_steps: int = 0
    # name -> receiver shift h (ef21 / econtrol): the running mean of the workers' shifts.
    shift: Params = field(default_factory=dict)


class AveragingProtocol(Protocol):
    """Workers send (compressed) `global - local`; the coordinator averages and steps outer SGD.

    encode / decode are an escape hatch that replaces the codec entirely (a stateless encoder gets
    the tensor name and the pseudo-gradient); with `compression` the worker state is the
    `ErrorFeedback` from `init_worker_state`, and payloads are decoded with the codec registry.
    """

    state_class: ClassVar[type[OuterState]] = OuterState

    def __init__(
        self,
        outer_lr: float,
        outer_momentum: float,
        nesterov: bool,
        compression: Compression = NO_COMPRESSION,
        encode: Encode | None = None,
        decode: Decode | None = None,
    ) -> None:
        name = type(self).__name__
        if outer_lr <= 0.0:
            raise ValueError(f"{name} outer_lr must be > 0, got {outer_lr}")
        if not 0.0 <= outer_momentum < 1.0:
            raise ValueError(f"{name} outer_momentum must be in [0, 1), got {outer_momentum}")
        if (encode is not None or decode is not None) and not compression.is_identity:
            raise ValueError(
                f"{name}: give either encode/decode or a compression, not both "
                f"(got codec={compression.codec!r}, error_feedback={compression.error_feedback!r})"
            )
        self.outer_lr = outer_lr
        self.outer_momentum = outer_momentum
        self.nesterov = nesterov
        self.compression = compression
        self.encode: Encode = encode if encode is not None else dense_encode
        if decode is not None:
            self.decode: Decode = decode
        else:
            self.decode = dense_values if compression.is_identity else registry.decode

    # ---- worker half -------------------------------------------------------------------------
    def init_worker_state(self, params: Params) -> ErrorFeedback | None:
        """The worker's error feedback (its buffers live across rounds); None when nothing is compressed."""
        return None if self.compression.is_identity else self.compression.new_feedback()

    def make_update(self, local: Params, global_: Params, state: Any) -> tuple[Update, Any]:
        """Send `global_ - local` for every tensor in `local`, through the error feedback if any.

        Without compression the worker state passes through unchanged; with it, `state` must be the
        `ErrorFeedback` from `init_worker_state` and is updated in place (and returned).
        """
        deltas = pseudo_gradient(local, global_)
        if self.compression.is_identity:
            return Update(payloads={n: self.encode(n, d) for n, d in deltas.items()}), state
        if not isinstance(state, ErrorFeedback):
            raise TypeError(
                f"{type(self).__name__} worker state must be the ErrorFeedback from init_worker_state, "
                f"got {type(state).__name__}"
            )
        return Update(payloads={n: state.step(n, d) for n, d in deltas.items()}), state

    # ---- coordinator half --------------------------------------------------------------------
    def init_server_state(self, global_: Params) -> OuterState:
        return self.state_class()

    def new_round(self, global_: Params) -> Accumulator:
        return MeanAccumulator(decode=self.decode)

    def round_mean(self, acc: Accumulator) -> Params:
        """The mean decoded message of the round (subclasses with their own accumulator override)."""
        if not isinstance(acc, MeanAccumulator):
            raise TypeError(f"{type(self).__name__} aggregates a MeanAccumulator, got {type(acc).__name__}")
        return acc.mean()

    def aggregate(self, global_: Params, acc: Accumulator, state: Any) -> tuple[Params, OuterState]:
        """Mean of the round's messages, through the mirror, then one outer (Nesterov) SGD step.

        Parameters no worker sent keep their values, momentum and shift. Returns new tensors;
        neither `global_` nor `state` is modified.
        """
        cls = self.state_class
        if not isinstance(state, cls):
            raise TypeError(f"{type(self).__name__} server state must be {cls.__name__}, got {type(state).__name__}")
        mean = self.round_mean(acc)
        shift = state.shift
        if self.compression.keeps_shift:
            mean, shift = mirror_step(self.compression.error_feedback, state.shift, mean)
        new_global, momentum = nesterov_sgd(
            global_, mean, state.momentum, lr=self.outer_lr, momentum=self.outer_momentum, nesterov=self.nesterov
        )
        return new_global, cls(momentum=momentum, outer_steps=state.outer_steps + 1, shift=shift)
