"""DiLoCo: local training, then an outer Nesterov step on the averaged pseudo-gradient.

Douillard et al., "DiLoCo: Distributed Low-Communication Training of Language Models",
arXiv:2311.08105. Each round every worker starts from the global parameters, takes H inner (AdamW)
steps on its own data, and sends the pseudo-gradient `theta_global - theta_local`. The coordinator
averages the pseudo-gradients and treats the mean as a gradient for an outer SGD with Nesterov momentum
(the paper's defaults: lr 0.7, momentum 0.9). The inner optimizer's state stays on the worker.

The paper sends dense pseudo-gradients (the default). A `compression:` block puts a codec and error
feedback in between (e.g. int8 pseudo-gradients); see `protocols.compressed`.
"""

from __future__ import annotations

from typing import ClassVar

from protocols.base import MeanAccumulator, Params
from protocols.compressed import (
    NO_COMPRESSION,
    AveragingProtocol,
    Compression,
    Decode,
    Encode,
    OuterState,
    dense_encode,
)
from protocols.config import DiLoCoConfig

__all__ = ["DiLoCo", "DiLoCoServerState", "dense_encode"]


class DiLoCoServerState(OuterState):
    """What the coordinator keeps between rounds: outer momentum, step count, mirror shift."""


class DiLoCo(AveragingProtocol):
    """DiLoCo (Douillard et al., arXiv:2311.08105): pseudo-gradients, mean, outer Nesterov SGD.

    encode / decode plug a stateless codec in between: `encode(name, delta)` turns one
    pseudo-gradient tensor into a Payload and `decode(payload)` turns it back into a dense tensor on
    the coordinator. `compression` instead runs a registry codec under error feedback, whose state
    the worker keeps across rounds. All default to dense.
    """

    kind: ClassVar[str] = "diloco"
    state_class: ClassVar[type[OuterState]] = DiLoCoServerState

    def __init__(
        self,
        outer_lr: float = 0.7,
        outer_momentum: float = 0.9,
        nesterov: bool = True,
        encode: Encode | None = None,
        decode: Decode | None = None,
        compression: Compression = NO_COMPRESSION,
    ) -> None:
        super().__init__(outer_lr, outer_momentum, nesterov, compression=compression, encode=encode, decode=decode)

    def new_round(self, global_: Params) -> MeanAccumulator:
        return MeanAccumulator(decode=self.decode)

    @classmethod
    def from_config(cls, cfg: DiLoCoConfig) -> DiLoCo:
        """Build from the `protocol` section of a run config (its `compression` block included)."""
        return cls(
            outer_lr=cfg.outer_lr,
            outer_momentum=cfg.outer_momentum,
            nesterov=cfg.nesterov,
            compression=Compression.from_config(cfg.compression),
        )
