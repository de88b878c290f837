"""SparseLoCo: DiLoCo whose pseudo-gradients go through a decayed error-feedback buffer, top-k, 2 bits.

Sarfi, Therien, Lidin, Belilovsky, "Communication Efficient LLM Pre-training with SparseLoCo",
arXiv:2508.15706. After H inner steps each worker folds its pseudo-gradient into a decayed error
buffer, e <- decay * e + (theta_global - theta_local) (decay 0.95), sends the top-k entries of every
4096-entry chunk of e (k = 64, 2-bit values, 12-bit packed indices: codec "sparseloco") and keeps
what was not delivered, e <- e - D(C(e)). The aggregator averages each coordinate over the workers
that sent it (a coordinate nobody sent gets no update) and takes an outer SGD step with lr 1 and no
momentum: the decayed buffer stands in for DiLoCo's outer momentum.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
from pydantic import Field, PositiveFloat, PositiveInt

from protocols.base import Accumulator, CheckedUpdate, View
from protocols.compressed import AveragingProtocol, AveragingSettings, Compression
from protocols.settings import Codec, CompressionConfig, OverlapConfig
from protocols.sparse_mean import SparseMeanAccumulator


class SparseLoCoCompression(CompressionConfig):
    """SparseLoCo's wire format (arXiv:2508.15706): top-64 of every 4096-entry chunk (density 1/64),
    2-bit values, 12-bit indices, of an error-feedback buffer decayed by 0.95 (EF14 with decay).

    Each coordinate is averaged over the workers that sent it, which needs the shift-free error
    feedbacks: "ef21" / "econtrol" (whose receiver adds a dense running shift) are not allowed.
    """

    codec: Codec = "sparseloco"
    density: float = Field(64 / 4096, gt=0.0, le=1.0)
    error_feedback: Literal["none", "ef14"] = "ef14"  # type: ignore[assignment]
    decay: float = Field(0.95, gt=0.0, le=1.0)


class SparseLoCoConfig(AveragingSettings):
    """SparseLoCo (Sarfi, Therien, Lidin, Belilovsky, arXiv:2508.15706).

    The paper's main setting: H = 15 inner AdamW steps, outer SGD with lr 1 and no momentum (the
    decayed error-feedback buffer plays the role of DiLoCo's outer momentum).
    """

    kind: Literal["sparseloco"] = "sparseloco"
    inner_steps: PositiveInt = 15  # H
    outer_lr: PositiveFloat = 1.0
    outer_momentum: float = Field(0.0, ge=0.0, lt=1.0)
    # Scale each worker's update, chunk by chunk, down to the median norm across workers (robustness).
    clip_to_median_norm: bool = False
    # senders: each coordinate averaged over the workers that sent it; workers: sum / all workers (the
    # paper's (1/R) sum_r rule).
    average_over: Literal["senders", "workers"] = "senders"
    compression: SparseLoCoCompression = SparseLoCoCompression()


PAPER_COMPRESSION = Compression.from_config(SparseLoCoCompression())


@dataclass
class MedianClipAccumulator(Accumulator):
    """Like `SparseMeanAccumulator`, after scaling each worker's update, chunk by chunk, to at most
    the median norm of that chunk across the workers that sent the tensor.

    A median needs every update, so this accumulator keeps all of them (sparse: indices and values)
    until the round closes: memory grows with the number of workers.
    """

    chunk: int = 4096
    over_all_workers: bool = False
    # (worker, weight, name -> (shape, flat indices, float32 values)) per folded update.
    updates: list[tuple[str, float, dict[str, tuple[tuple[int, ...], torch.Tensor, torch.Tensor]]]] = field(
        default_factory=list
    )

    view: ClassVar[View] = "coordinates"

    def fold(self, worker_id: str, update: CheckedUpdate) -> None:
        entries = {}
        for name, decoded in update.tensors.items():
            assert decoded.indices is not None  # the "coordinates" view
            entries[name] = (decoded.shape, decoded.indices, decoded.values)
        self.updates.append((worker_id, update.weight, entries))

    @property
    def count(self) -> int:
        return len(self.updates)

    def _chunk_norms(self, numel: int, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        squares = torch.zeros(-(-numel // self.chunk), device=values.device)
        return squares.index_add_(0, indices // self.chunk, values.square()).sqrt()

    def mean(self) -> Mapping[str, torch.Tensor]:
        if not self.updates:
            raise ValueError("no updates were folded into this round")
        out = SparseMeanAccumulator(
            workers=[worker for worker, _, _ in self.updates],
            over_all_workers=self.over_all_workers,
            total_weight=sum(weight for _, weight, _ in self.updates),
        )
        names = {name for _, _, entries in self.updates for name in entries}
        for name in sorted(names):
            senders = [(weight, entries[name]) for _, weight, entries in self.updates if name in entries]
            shape = senders[0][1][0]
            numel = int(torch.Size(shape).numel())
            norms = torch.stack([self._chunk_norms(numel, idx, vals) for _, (_, idx, vals) in senders])
            median = norms.median(dim=0).values  # the lower middle value for an even number of senders
            scales = torch.where(norms > median, median / norms.clamp_min(1e-30), torch.ones_like(norms))
            for k, (weight, (_, idx, vals)) in enumerate(senders):
                out.add(name, shape, idx, vals * scales[k][idx // self.chunk], weight)
        return out.mean()


class SparseLoCo(AveragingProtocol):
    """SparseLoCo (Sarfi et al., arXiv:2508.15706): EF14 with decay, chunked top-k at 2 bits,
    per-coordinate averaging over senders, outer SGD (lr 1, no momentum).

    Downlink default ("sparse"): the paper's aggregate is itself sparse, so it goes back as the union of
    the senders' coordinates with their exact aggregated values, or as the senders' payloads relayed for
    every replica to fold again, whichever is smaller; replicas apply exactly what the aggregator computed.
    """

    settings = SparseLoCoConfig
    default_downlink = "sparse"

    def __init__(
        self,
        outer_lr: float = 1.0,
        outer_momentum: float = 0.0,
        compression: Compression = PAPER_COMPRESSION,
        clip_to_median_norm: bool = False,
        average_over: str = "senders",
        overlap: OverlapConfig | None = None,
    ) -> None:
        if compression.keeps_shift:
            raise ValueError(
                "SparseLoCo averages each coordinate over its senders, which a receiver shift would break: "
                f"error_feedback must be 'none' or 'ef14', got {compression.error_feedback!r}"
            )
        super().__init__(outer_lr, outer_momentum, nesterov=False, compression=compression, overlap=overlap)
        self.clip_to_median_norm = clip_to_median_norm
        if average_over not in ("senders", "workers"):
            raise ValueError(f"average_over must be 'senders' or 'workers', got {average_over!r}")
        self.over_all_workers = average_over == "workers"

    @classmethod
    def from_settings(cls, settings: SparseLoCoConfig) -> SparseLoCo:
        if settings.robust.kind != "none":
            raise ValueError(f"sparseloco aggregates sparse coordinates: robust.kind {settings.robust.kind!r} is "
                             f"for dense messages; use protocol.clip_to_median_norm (per chunk) instead")
        return cls(
            outer_lr=settings.outer_lr,
            outer_momentum=settings.outer_momentum,
            compression=Compression.from_config(settings.compression, "protocol.compression"),
            clip_to_median_norm=settings.clip_to_median_norm,
            average_over=settings.average_over,
            overlap=settings.overlap,
        )

    def new_round(self) -> Accumulator:
        if self.clip_to_median_norm:
            return MedianClipAccumulator(
                chunk=int(self.compression.params.get("chunk", 4096)), over_all_workers=self.over_all_workers
            )
        return SparseMeanAccumulator(over_all_workers=self.over_all_workers)

    def round_mean(self, acc: Accumulator) -> Mapping[str, torch.Tensor]:
        if not isinstance(acc, SparseMeanAccumulator | MedianClipAccumulator):
            raise TypeError(f"SparseLoCo aggregates a SparseMeanAccumulator, got {type(acc).__name__}")
        return acc.mean()
