"""EControl: data-parallel training on compressed updates with error control.

Gao, Islamov, Stich, "EControl: Fast Distributed Optimization with Compression and Error Control",
ICLR 2024, arXiv:2311.05645. Each worker turns its local update g (with inner_steps = 1, the
paper's setting, that is one optimizer step: g = theta_global - theta_local) into the message
d = C(eta * e + g - h), then e <- e + g - h - D(d) and h <- h + D(d). The coordinator keeps h_bar,
the mean of the workers' h, and applies u = h_bar + mean(D(d)) (then h_bar <- u) with an outer SGD
step of lr `outer_lr` (1.0 = plain averaging of the local updates). eta of the order of the
compressor's delta (0.1 for top-10%) converges where plain compression stalls; much larger eta
diverges. inner_steps > 1 compresses per-round pseudo-gradients instead.

error_feedback may be set to "none", "ef14" or "ef21" to compare against EControl on the same codec.
"""

from __future__ import annotations

from typing import ClassVar

from protocols.compressed import AveragingProtocol, Compression
from protocols.config import EControlCompression, EControlConfig

PAPER_COMPRESSION = Compression.from_config(EControlCompression())


class EControl(AveragingProtocol):
    """EControl (Gao, Islamov, Stich, arXiv:2311.05645): compressed updates with error control,
    averaged through the receiver's shift, applied by outer SGD (lr 1, no momentum by default)."""

    kind: ClassVar[str] = "econtrol"

    def __init__(
        self, outer_lr: float = 1.0, outer_momentum: float = 0.0, compression: Compression = PAPER_COMPRESSION
    ) -> None:
        super().__init__(outer_lr, outer_momentum, nesterov=False, compression=compression)

    @classmethod
    def from_config(cls, cfg: EControlConfig) -> EControl:
        return cls(
            outer_lr=cfg.outer_lr,
            outer_momentum=cfg.outer_momentum,
            compression=Compression.from_config(cfg.compression),
        )
