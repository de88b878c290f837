"""EControl: data-parallel training on compressed updates with error control.

Gao, Islamov, Stich, "EControl: Fast Distributed Optimization with Compression and Error Control",
ICLR 2024, arXiv:2311.05645. Each worker turns its local update g (with inner_steps = 1, the paper's
setting, that is one optimizer step: g = theta_global - theta_local) into the message
d = C(eta * e + g - h), then e <- e + g - h - D(d) and h <- h + D(d). The aggregator keeps every
worker's h_i (h_i <- h_i + D(d_i) when worker i sends) and uses u = mean_i h_i over every worker it has
heard from, so a worker that misses a round leaves no lasting bias (its h_i did not move on either side);
replicas apply u with an outer SGD step of lr `outer_lr` (1.0 = plain averaging of the local updates).

eta defaults to the compressor's contraction delta (0.1 for top-10%): the paper's analysis takes eta of
the order of delta. Measured on heterogeneous least squares with top-10% (tests/unit/test_error_feedback_paper.py)
eta in [delta/2, 1.5 delta] converges to machine precision and eta >= 3 delta diverges.
inner_steps > 1 compresses per-round pseudo-gradients instead.

The aggregate u is dense (a sum of shifts), and the paper broadcasts it as it is: the downlink default is
dense. error_feedback may be set to "none", "ef14" or "ef21" to compare against EControl on the same codec.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, PositiveFloat, PositiveInt

from protocols.compressed import AveragingProtocol, AveragingSettings, Compression
from protocols.settings import Codec, CompressionConfig, FeedbackKind, OverlapConfig, RobustConfig


class EControlCompression(CompressionConfig):
    """EControl (arXiv:2311.05645) on chunked top-10%; eta unset = the codec's delta (0.1 here)."""

    codec: Codec = "topk"
    density: float = Field(0.1, gt=0.0, le=1.0)
    error_feedback: FeedbackKind = "econtrol"


class EControlConfig(AveragingSettings):
    """EControl (Gao, Islamov, Stich, ICLR 2024, arXiv:2311.05645): compressed data-parallel training.

    inner_steps 1 sends every step's update (the paper's setting); larger values compress per-round
    pseudo-gradients instead. Outer SGD lr 1, no momentum = plain averaging of the local updates.
    """

    kind: Literal["econtrol"] = "econtrol"
    inner_steps: PositiveInt = 1
    outer_lr: PositiveFloat = 1.0
    outer_momentum: float = Field(0.0, ge=0.0, lt=1.0)
    compression: EControlCompression = EControlCompression()


PAPER_COMPRESSION = Compression.from_config(EControlCompression())


class EControl(AveragingProtocol):
    """EControl (Gao, Islamov, Stich, arXiv:2311.05645): compressed updates with error control,
    averaged through the per-worker shifts, applied by outer SGD (lr 1, no momentum by default)."""

    settings = EControlConfig

    def __init__(
        self,
        outer_lr: float = 1.0,
        outer_momentum: float = 0.0,
        compression: Compression = PAPER_COMPRESSION,
        overlap: OverlapConfig | None = None,
        robust: RobustConfig | None = None,
    ) -> None:
        super().__init__(outer_lr, outer_momentum, nesterov=False, compression=compression, overlap=overlap,
                         robust=robust)

    @classmethod
    def from_settings(cls, settings: EControlConfig) -> EControl:
        return cls(
            outer_lr=settings.outer_lr,
            outer_momentum=settings.outer_momentum,
            compression=Compression.from_config(settings.compression, "protocol.compression"),
            overlap=settings.overlap,
            robust=settings.robust,
        )
