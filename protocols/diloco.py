"""DiLoCo: local training, then an outer Nesterov step on the averaged pseudo-gradient.

Douillard et al., "DiLoCo: Distributed Low-Communication Training of Language Models",
arXiv:2311.08105. Each round every worker starts from the replica's parameters, takes H inner (AdamW)
steps on its own data, and sends the pseudo-gradient `theta_global - theta_local`. The aggregator averages
the pseudo-gradients; every replica treats the mean as a gradient for an outer SGD with Nesterov momentum
(the paper's defaults: lr 0.7, momentum 0.9). The inner optimizer's state stays on the worker.

The paper sends dense pseudo-gradients both ways, so the defaults are a dense uplink and a dense
downlink (`downlink.codec: auto`); a `compression:` block puts a codec and error feedback on the uplink
(e.g. int8 pseudo-gradients), a `downlink:` block one under the coordinator's error feedback on the way
back (see `protocols.downlink`).
"""

from __future__ import annotations

from typing import Literal

from protocols.compressed import AveragingProtocol, AveragingSettings, Compression
from protocols.settings import OverlapConfig, RobustConfig


class DiLoCoConfig(AveragingSettings):
    """DiLoCo (Douillard et al., arXiv:2311.08105); the paper sends dense pseudo-gradients."""

    kind: Literal["diloco"] = "diloco"
    nesterov: bool = True


class DiLoCo(AveragingProtocol):
    """DiLoCo (Douillard et al., arXiv:2311.08105): pseudo-gradients, mean, outer Nesterov SGD."""

    settings = DiLoCoConfig

    def __init__(
        self,
        outer_lr: float = 0.7,
        outer_momentum: float = 0.9,
        nesterov: bool = True,
        compression: Compression | None = None,
        overlap: OverlapConfig | None = None,
        robust: RobustConfig | None = None,
    ) -> None:
        super().__init__(outer_lr, outer_momentum, nesterov, compression=compression or Compression(), overlap=overlap,
                         robust=robust)

    @classmethod
    def from_settings(cls, settings: DiLoCoConfig) -> DiLoCo:
        """Build from the `protocol` section of a run config (its `compression` block included)."""
        return cls(
            outer_lr=settings.outer_lr,
            outer_momentum=settings.outer_momentum,
            nesterov=settings.nesterov,
            compression=Compression.from_config(settings.compression, "protocol.compression"),
            overlap=settings.overlap,
            robust=settings.robust,
        )
