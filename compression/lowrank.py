"""Rank-r compression by one warm-started power iteration ("lowrank"), as in PowerSGD.

PowerSGD (Vogels, Karimireddy, Jaggi, NeurIPS 2019, arXiv:1905.13727) approximates a matrix M
(m x n) by P Q^T with P = orth(M Q_prev) (m x r) and Q = M^T P (n x r): one step of subspace
iteration per call, started from the previous call's Q for the same tensor, so over successive
calls the subspace tracks M's dominant singular directions at the cost of a single iteration.

Tensors of more than 2 dims are viewed as (shape[0], -1). 1-D, 0-d and tiny tensors, for which
r (m + n) >= m n, are sent dense inside the payload (meta mode "dense"). The warm start lives in the
compressor (per `key`); decoding needs only the payload, which carries both P and Q.
"""

from __future__ import annotations

import zlib
from typing import ClassVar

import torch

from compression.base import Compressor, component, dtype_name, meta_dtype, meta_int
from compression.payload import Payload, PayloadError


class LowRank(Compressor):
    """Codec "lowrank": P (m x r) and Q (n x r) with M ~ P Q^T, float32 (float64 for float64 inputs)."""

    codec: ClassVar[str] = "lowrank"

    def __init__(self, rank: int = 4, seed: int = 0) -> None:
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        self.rank, self.seed = rank, seed
        self._warm: dict[str, torch.Tensor] = {}

    def warm_start(self, key: str) -> torch.Tensor | None:
        """The Q kept for `key` (None before the first compression)."""
        return self._warm.get(key)

    def _initial_q(self, key: str, cols: int, rank: int, like: torch.Tensor) -> torch.Tensor:
        q = self._warm.get(key)
        if q is not None and q.shape == (cols, rank) and q.dtype == like.dtype and q.device == like.device:
            return q
        gen = torch.Generator(device="cpu").manual_seed(zlib.crc32(f"{self.seed}:{key}".encode()))
        return torch.randn(cols, rank, generator=gen, dtype=like.dtype).to(like.device)

    def _encode(self, x: torch.Tensor, key: str) -> Payload:
        shape = tuple(x.shape)
        if x.dim() < 2:
            return self._dense(x)
        rows, cols = shape[0], x.numel() // max(1, shape[0])
        rank = min(self.rank, rows, cols)
        if rank * (rows + cols) >= rows * cols:
            return self._dense(x)
        m = x.reshape(rows, cols).to(torch.promote_types(x.dtype, torch.float32))
        p = torch.linalg.qr(m @ self._initial_q(key, cols, rank, m)).Q
        q = m.T @ p
        self._warm[key] = q
        return Payload(
            self.codec,
            shape,
            x.dtype,
            tensors={"p": p.reshape(-1), "q": q.reshape(-1)},
            meta={
                "mode": "lowrank",
                "rows": rows,
                "cols": cols,
                "rank": rank,
                "value_dtype": dtype_name(m.dtype),
            },
        )

    def _dense(self, x: torch.Tensor) -> Payload:
        values = x.reshape(-1)
        return Payload(self.codec, tuple(x.shape), x.dtype, tensors={"values": values}, meta={"mode": "dense"})

    def _validate(self, p: Payload) -> None:
        mode = p.meta.get("mode")
        if mode == "dense":
            values = component(p, "values", p.dtype)
            if values.numel() != p.numel:
                raise PayloadError(
                    f"{p.codec} payload shape product mismatch: shape {p.shape} has {p.numel} elements, "
                    f"'values' has {values.numel()}"
                )
            return
        if mode != "lowrank":
            raise PayloadError(f"{p.codec} payload meta mode={mode!r} is not 'lowrank' or 'dense'")
        rows, cols, rank = meta_int(p, "rows"), meta_int(p, "cols"), meta_int(p, "rank", 1)
        if rows * cols != p.numel:
            raise PayloadError(
                f"{p.codec} payload shape product mismatch: rows {rows} x cols {cols} != numel {p.numel}"
            )
        if rank > min(rows, cols):
            raise PayloadError(f"{p.codec} payload rank {rank} exceeds min(rows, cols) = {min(rows, cols)}")
        value_dtype = meta_dtype(p, "value_dtype")
        component(p, "p", value_dtype, rows * rank)
        component(p, "q", value_dtype, cols * rank)

    def _decode(self, p: Payload) -> torch.Tensor:
        if p.meta["mode"] == "dense":
            return p.tensors["values"].view(p.shape)
        rows, cols, rank = int(p.meta["rows"]), int(p.meta["cols"]), int(p.meta["rank"])
        approx = p.tensors["p"].view(rows, rank) @ p.tensors["q"].view(cols, rank).T
        return approx.to(p.dtype).view(p.shape)
