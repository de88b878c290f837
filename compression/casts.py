"""Dense codecs: the identity ("dense") and half-precision casts ("fp16", "bf16")."""

from __future__ import annotations

from typing import ClassVar

import torch

from compression.base import Compressor, component
from compression.payload import Payload, PayloadError, dense, dense_values


class Dense(Compressor):
    """The tensor itself (see `compression.payload.dense`: contiguous, on the CPU)."""

    codec: ClassVar[str] = "dense"
    floating_only: ClassVar[bool] = False

    def _encode(self, x: torch.Tensor, key: str) -> Payload:
        return dense(x)

    def _validate(self, p: Payload) -> None:
        dense_values(p)

    def _decode(self, p: Payload) -> torch.Tensor:
        return dense_values(p)


class _Cast(Compressor):
    """Send the tensor cast to a 16-bit float type; decode casts back to the original dtype."""

    wire_dtype: ClassVar[torch.dtype]

    def _encode(self, x: torch.Tensor, key: str) -> Payload:
        values = x.reshape(-1).to(self.wire_dtype)
        return Payload(self.codec, tuple(x.shape), x.dtype, tensors={"values": values})

    def _validate(self, p: Payload) -> None:
        values = component(p, "values", self.wire_dtype)
        if values.numel() != p.numel:
            raise PayloadError(
                f"{p.codec} payload shape product mismatch: shape {p.shape} has {p.numel} elements, "
                f"'values' has {values.numel()}"
            )

    def _decode(self, p: Payload) -> torch.Tensor:
        return p.tensors["values"].to(p.dtype).view(p.shape)


class Fp16(_Cast):
    """IEEE half precision: relative error <= 2**-11 inside its range (|x| <= 65504)."""

    codec: ClassVar[str] = "fp16"
    wire_dtype: ClassVar[torch.dtype] = torch.float16


class Bf16(_Cast):
    """bfloat16: float32's range with 8 bits of mantissa, relative error <= 2**-8."""

    codec: ClassVar[str] = "bf16"
    wire_dtype: ClassVar[torch.dtype] = torch.bfloat16
