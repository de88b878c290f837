"""Checks an incoming update against the global state before anything from it is applied."""

from __future__ import annotations

from collections.abc import Callable

import torch

from compression.payload import Payload
from coordinator.errors import Code, Rejected
from protocols.base import Params

Decoder = Callable[[Payload], torch.Tensor]


def check_update(worker_id: str, payloads: dict[str, Payload], global_: Params, decode: Decoder) -> None:
    """Raise `Rejected` naming the first problem: unknown or missing tensor, wrong shape/dtype, NaN/Inf.

    `decode` turns a payload into a dense tensor (it validates the payload against its own header).
    """
    unknown = sorted(set(payloads) - set(global_))
    if unknown:
        raise Rejected(Code.INVALID_ARGUMENT, f"worker {worker_id}: unknown tensor name(s) {unknown}")
    missing = sorted(set(global_) - set(payloads))
    if missing:
        raise Rejected(Code.INVALID_ARGUMENT, f"worker {worker_id}: update lacks tensor(s) {missing}")
    for name, payload in payloads.items():
        want = global_[name]
        if tuple(payload.shape) != tuple(want.shape):
            raise Rejected(
                Code.INVALID_ARGUMENT,
                f"worker {worker_id}: tensor {name!r} has shape {list(payload.shape)}, expected {list(want.shape)}",
            )
        if payload.dtype != want.dtype:
            raise Rejected(
                Code.INVALID_ARGUMENT,
                f"worker {worker_id}: tensor {name!r} has dtype {payload.dtype}, expected {want.dtype}",
            )
        try:
            value = decode(payload)
        except ValueError as err:
            raise Rejected(Code.INVALID_ARGUMENT, f"worker {worker_id}: tensor {name!r}: {err}") from None
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise Rejected(Code.INVALID_ARGUMENT, f"worker {worker_id}: tensor {name!r} contains NaN or Inf")


def check_initial_state(worker_id: str, payloads: dict[str, Payload], decode: Decoder) -> Params:
    """Decode an offered initial state, refusing empty or non-finite ones."""
    if not payloads:
        raise Rejected(Code.INVALID_ARGUMENT, f"worker {worker_id}: initial state has no tensors")
    params: Params = {}
    for name, payload in payloads.items():
        try:
            value = decode(payload)
        except ValueError as err:
            raise Rejected(Code.INVALID_ARGUMENT, f"worker {worker_id}: tensor {name!r}: {err}") from None
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise Rejected(Code.INVALID_ARGUMENT, f"worker {worker_id}: initial tensor {name!r} has NaN or Inf")
        params[name] = value.clone()
    return params
