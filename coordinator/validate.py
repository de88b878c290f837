"""Checks an offered initial state before the coordinator installs it.

Updates are checked by `protocols.check` (shared with every transport); this is the one dense state a
worker uploads when the run starts.
"""

from __future__ import annotations

import torch

from compression.payload import Payload, PayloadError, dense_values
from coordinator.errors import Code, Rejected
from protocols.replica import Params


def check_initial_state(worker_id: str, payloads: dict[str, Payload]) -> Params:
    """Decode an offered initial state (dense payloads), refusing empty or non-finite ones. The tensors are the
    payloads' own (no copy): the caller copies them unless they are its to keep."""
    if not payloads:
        raise Rejected(Code.INVALID_ARGUMENT, f"worker {worker_id}: initial state has no tensors")
    params: Params = {}
    for name, payload in payloads.items():
        try:
            value = dense_values(payload)
        except PayloadError as err:
            raise Rejected(Code.INVALID_ARGUMENT, f"worker {worker_id}: tensor {name!r}: {err}") from None
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise Rejected(Code.INVALID_ARGUMENT, f"worker {worker_id}: initial tensor {name!r} has NaN or Inf")
        params[name] = value
    return params
