"""The one data type that crosses the compression boundary.

A `Payload` is what a codec produces and what travels on the wire, as it is: packed bytes and small
component tensors plus the scalars needed to decode them. It is a plain dataclass, never a proto;
`protocols/wire/serde.py` is the only place that turns it into wire messages.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

Scalar = int | float | str | bool


class PayloadError(ValueError):
    """A payload does not match its own header (packed length, chunk count, index range, ...).

    The message names the mismatch; whoever raised it applied nothing from the payload.
    """


@dataclass(frozen=True)
class Payload:
    """A compressed (or dense) tensor.

    codec:   name of the codec that can decode it (see `compression.registry`).
    shape:   shape of the original tensor.
    dtype:   dtype of the original tensor.
    tensors: the component tensors (e.g. packed indices as uint8, scales as float16).
    meta:    scalars the decoder needs (chunk size, k, seed, bits, ...).
    """

    codec: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Scalar] = field(default_factory=dict)

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    def nbytes(self) -> int:
        """Bytes of tensor data this payload puts on the wire (headers excluded)."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def dense(tensor: torch.Tensor) -> Payload:
    """The identity 'codec': the tensor itself, contiguous, on the CPU."""
    t = tensor.detach().contiguous().cpu()
    return Payload(codec="dense", shape=tuple(t.shape), dtype=t.dtype, tensors={"values": t})


def dense_values(payload: Payload) -> torch.Tensor:
    """Decode a `dense` payload, checking it against its header."""
    if payload.codec != "dense":
        raise PayloadError(f"expected codec 'dense', got {payload.codec!r}")
    values = payload.tensors.get("values")
    if values is None:
        raise PayloadError("dense payload has no 'values' tensor")
    if tuple(values.shape) != payload.shape:
        raise PayloadError(f"dense payload shape {tuple(values.shape)} does not match header {payload.shape}")
    if values.dtype != payload.dtype:
        raise PayloadError(f"dense payload dtype {values.dtype} does not match header {payload.dtype}")
    return values
