"""DiLoCo: local training, then an outer Nesterov step on the averaged pseudo-gradient.

Douillard et al., "DiLoCo: Distributed Low-Communication Training of Language Models",
arXiv:2311.08105. Each round every worker starts from the global parameters, takes H inner (AdamW)
steps on its own data, and sends the pseudo-gradient `theta_global - theta_local`. The coordinator
averages the pseudo-gradients and treats the mean as a gradient for an outer SGD with Nesterov momentum
(the paper's defaults: lr 0.7, momentum 0.9). The inner optimizer's state stays on the worker.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from compression.payload import Payload, dense, dense_values
from protocols.base import Accumulator, MeanAccumulator, Params, Protocol, Update
from protocols.config import DiLoCoConfig
from protocols.outer import nesterov_sgd

Encode = Callable[[str, torch.Tensor], Payload]
Decode = Callable[[Payload], torch.Tensor]


def dense_encode(name: str, tensor: torch.Tensor) -> Payload:
    """The default encoder: send the pseudo-gradient uncompressed (module-level so it pickles)."""
    return dense(tensor)


@dataclass
class DiLoCoServerState:
    """What the coordinator keeps between rounds."""

    # name -> outer momentum buffer [same shape as the parameter], at least float32.
    momentum: Params = field(default_factory=dict)
    # Outer steps applied so far.
    outer_steps: int = 0


class DiLoCo(Protocol):
    """DiLoCo (Douillard et al., arXiv:2311.08105): pseudo-gradients, mean, outer Nesterov SGD.

    encode / decode plug a compressor in between: `encode(name, delta)` turns one pseudo-gradient
    tensor into a Payload (the name lets an error-feedback compressor keep per-tensor state) and
    `decode(payload)` turns it back into a dense tensor on the coordinator. Both default to dense.
    """

    kind: ClassVar[str] = "diloco"

    def __init__(
        self,
        outer_lr: float = 0.7,
        outer_momentum: float = 0.9,
        nesterov: bool = True,
        encode: Encode | None = None,
        decode: Decode | None = None,
    ) -> None:
        if outer_lr <= 0.0:
            raise ValueError(f"DiLoCo outer_lr must be > 0, got {outer_lr}")
        if not 0.0 <= outer_momentum < 1.0:
            raise ValueError(f"DiLoCo outer_momentum must be in [0, 1), got {outer_momentum}")
        self.outer_lr = outer_lr
        self.outer_momentum = outer_momentum
        self.nesterov = nesterov
        self.encode: Encode = encode if encode is not None else dense_encode
        self.decode: Decode = decode if decode is not None else dense_values

    @classmethod
    def from_config(cls, cfg: DiLoCoConfig) -> DiLoCo:
        """Build from the `protocol` section of a run config (dense payloads only, for now)."""
        comp = cfg.compression
        if comp.codec != "none" or comp.error_feedback != "none":
            raise ValueError(
                "protocol.compression is not wired into DiLoCo yet: codec must be 'none' and "
                f"error_feedback 'none', got codec={comp.codec!r}, error_feedback={comp.error_feedback!r}"
            )
        return cls(outer_lr=cfg.outer_lr, outer_momentum=cfg.outer_momentum, nesterov=cfg.nesterov)

    # ---- worker half -------------------------------------------------------------------------
    def make_update(self, local: Params, global_: Params, state: Any) -> tuple[Update, Any]:
        """Encode `delta = global_ - local` for every tensor the worker trained (local's names).

        Shapes and dtypes must match the global tensors; the worker state passes through unchanged.
        """
        payloads: dict[str, Payload] = {}
        for name, theta_local in local.items():
            theta_global = global_.get(name)
            if theta_global is None:
                raise ValueError(f"local tensor {name!r} is not among the global parameters")
            if theta_global.shape != theta_local.shape or theta_global.dtype != theta_local.dtype:
                raise ValueError(
                    f"local tensor {name!r} is {theta_local.dtype}{tuple(theta_local.shape)}, "
                    f"global is {theta_global.dtype}{tuple(theta_global.shape)}"
                )
            delta = theta_global.detach().to(theta_local.device) - theta_local.detach()
            payloads[name] = self.encode(name, delta)
        return Update(payloads=payloads), state

    # ---- coordinator half --------------------------------------------------------------------
    def init_server_state(self, global_: Params) -> DiLoCoServerState:
        return DiLoCoServerState()

    def new_round(self, global_: Params) -> MeanAccumulator:
        return MeanAccumulator(decode=self.decode)

    def aggregate(self, global_: Params, acc: Accumulator, state: Any) -> tuple[Params, DiLoCoServerState]:
        """Weighted mean of the round's pseudo-gradients, then one outer (Nesterov) SGD step.

        Parameters no worker sent this round keep their values and their momentum. Returns new
        tensors; neither `global_` nor `state` is modified.
        """
        if not isinstance(acc, MeanAccumulator):
            raise TypeError(f"DiLoCo aggregates a MeanAccumulator, got {type(acc).__name__}")
        if not isinstance(state, DiLoCoServerState):
            raise TypeError(f"DiLoCo server state must be DiLoCoServerState, got {type(state).__name__}")
        pseudo_grad = acc.mean()
        new_global, momentum = nesterov_sgd(
            global_,
            pseudo_grad,
            state.momentum,
            lr=self.outer_lr,
            momentum=self.outer_momentum,
            nesterov=self.nesterov,
        )
        return new_global, DiLoCoServerState(momentum=momentum, outer_steps=state.outer_steps + 1)
