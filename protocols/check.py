"""Checks an update against what the protocol expects, decoding it exactly as the accumulator folds it.

`check_update` decodes every tensor as the protocol's accumulator will fold it (dense tensors, or flat
coordinates and values) and checks names (exactly the protocol's `uplink_names`; a tensor the protocol
keeps frozen on the clients is refused by name), shapes, dtypes, the run's codec, the payload against its own
header, indices in range and not repeated, finite values, the weight and the size. Folding then only
adds what was decoded, so an update is applied whole or not at all.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any

import torch

from compression import registry
from compression.payload import PayloadError
from protocols.base import CheckedUpdate, Decoded, Protocol, Update, View
from protocols.replica import Replica
from protocols.sorting import argsort


class UpdateRejected(ValueError):
    """An update that cannot be folded; the message names the worker, the tensor and what was wrong.
    `duplicate` marks a second update from the same worker in one round. Nothing of it was folded."""

    def __init__(self, message: str, duplicate: bool = False) -> None:
        super().__init__(message)
        self.duplicate = duplicate


# The largest weight an update may carry (tokens or samples trained on): far above any real count, far below
# what turns a weighted sum in float32 into inf (a weight of 1e39 did).
MAX_WEIGHT = 1e15
# Default bound on an update's magnitude, relative to the model (`cluster.max_update_ratio`): no decoded value
# may exceed ratio * max(1, the largest |parameter| of the tensors sent). A pseudo-gradient, a weight delta or
# the weights themselves (FedAvg) stay within a few times the largest parameter; 100x is far from any honest
# update and far below what overflows a float32 sum (a lone finite 3e38 did).
DEFAULT_MAX_UPDATE_RATIO = 100.0


@dataclass(frozen=True)
class Expectation:
    """What a valid update for one round looks like."""

    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, torch.dtype]
    codec: str  # the run's uplink codec, as payloads name it
    view: View  # how the accumulator folds: dense tensors or coordinates
    max_bytes: int  # no codec makes an update bigger than twice the dense tensors
    # Replica tensors that updates must not carry (`Protocol.uplink_names`: frozen on every client).
    withheld: frozenset[str] = frozenset()
    # The largest |value| a decoded update may hold (see DEFAULT_MAX_UPDATE_RATIO).
    max_abs: float = math.inf


def expectation(protocol: Protocol[Any, Any], replica: Replica, view: View,
                max_update_ratio: float = DEFAULT_MAX_UPDATE_RATIO) -> Expectation:
    """What a valid update looks like: every tensor of `protocol.uplink_names` (by default the whole
    replica), nothing else, in the run's uplink codec, no value above `max_update_ratio` times the largest
    |parameter| (at least 1)."""
    every = frozenset(replica.params)
    sent = protocol.uplink_names(every)
    if not sent <= every or (every and not sent):
        raise ValueError(f"{type(protocol).__name__}.uplink_names must name a non-empty subset of the replica's "
                         f"tensors; it named {sorted(sent - every) or 'none'}")
    params = {n: t for n, t in replica.params.items() if n in sent}
    dense_bytes = sum(t.numel() * t.element_size() for t in params.values())
    return Expectation(
        shapes={n: tuple(t.shape) for n, t in params.items()},
        dtypes={n: t.dtype for n, t in params.items()},
        codec=protocol.uplink_codec,
        view=view,
        max_bytes=2 * dense_bytes + 4096,
        withheld=every - sent,
        max_abs=max_update_ratio * max([1.0, *(_abs_max(t) for t in params.values())]),
    )


def _abs_max(t: torch.Tensor) -> float:
    if not t.is_floating_point() or t.numel() == 0:
        return 0.0
    return float(t.detach().abs().max())


def _decode(who: str, name: str, payload: Any, view: View) -> Decoded:
    shape = tuple(payload.shape)
    numel = math.prod(shape)
    if registry.is_sparse(payload.codec):
        indices, values = registry.sparse_view(payload)
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= numel):
            raise UpdateRejected(f"{who}: tensor {name!r} has indices out of range [0, {numel})")
        if torch.unique(indices).numel() != indices.numel():
            raise UpdateRejected(f"{who}: tensor {name!r} repeats indices (each coordinate may be sent once)")
        if view == "coordinates":
            return Decoded(shape, values.to(torch.float32), indices)
        return Decoded(shape, registry.decode(payload))
    dense = registry.decode(payload)
    if view == "coordinates":
        flat = dense.reshape(-1)
        return Decoded(shape, flat.to(torch.float32), torch.arange(flat.numel(), device=flat.device))
    return Decoded(shape, dense)


def check_update(worker_id: str, update: Update, expect: Expectation) -> CheckedUpdate:
    """The update decoded for folding, or `UpdateRejected` naming the first problem."""
    who = f"worker {worker_id}"
    if not (math.isfinite(update.weight) and 0 < update.weight <= MAX_WEIGHT):
        raise UpdateRejected(
            f"{who}: update weight must be finite and > 0, got {update.weight} (at most {MAX_WEIGHT:g})")
    frozen = sorted(set(update.payloads) & expect.withheld)
    if frozen:
        raise UpdateRejected(
            f"{who}: update carries tensor(s) {frozen}, which this protocol keeps frozen on every client: an "
            "update carries only what the clients train"
        )
    unknown = sorted(set(update.payloads) - set(expect.shapes))
    if unknown:
        raise UpdateRejected(f"{who}: unknown tensor name(s) {unknown}")
    missing = sorted(set(expect.shapes) - set(update.payloads))
    if missing:
        raise UpdateRejected(f"{who}: update lacks tensor(s) {missing}")
    if update.nbytes() > expect.max_bytes:
        raise UpdateRejected(f"{who}: update of {update.nbytes()} bytes exceeds the limit of {expect.max_bytes}")
    batched = _checked_together(update, expect) if expect.view == "coordinates" else None
    if batched is not None:
        return batched
    # One by one, naming the first problem (or the same update, where reading it together was not possible).
    tensors: dict[str, Decoded] = {}
    for name, payload in update.payloads.items():
        if tuple(payload.shape) != expect.shapes[name]:
            raise UpdateRejected(
                f"{who}: tensor {name!r} has shape {list(payload.shape)}, expected {list(expect.shapes[name])}"
            )
        # Error feedback keeps its buffers (and so sends) in at least float32: a bf16 tensor's update is float32.
        allowed = {expect.dtypes[name], torch.promote_types(expect.dtypes[name], torch.float32)}
        if payload.dtype not in allowed:
            raise UpdateRejected(
                f"{who}: tensor {name!r} has dtype {payload.dtype}, expected one of {sorted(map(str, allowed))}"
            )
        if payload.codec != expect.codec:
            raise UpdateRejected(
                f"{who}: tensor {name!r} is encoded with codec {payload.codec!r}, this run's uplink codec is "
                f"{expect.codec!r}"
            )
        try:
            decoded = _decode(who, name, payload, expect.view)
        except (PayloadError, ValueError) as err:
            if isinstance(err, UpdateRejected):
                raise
            raise UpdateRejected(f"{who}: tensor {name!r}: {err}") from None
        if decoded.values.is_floating_point() and not bool(torch.isfinite(decoded.values).all()):
            raise UpdateRejected(f"{who}: tensor {name!r} contains NaN or Inf")
        if decoded.values.numel() and float(decoded.values.abs().max()) > expect.max_abs:
            raise UpdateRejected(
                f"{who}: tensor {name!r} holds a value of magnitude {float(decoded.values.abs().max()):.3g}, over "
                f"the bound of {expect.max_abs:.3g} (cluster.max_update_ratio times the largest parameter)")
        tensors[name] = decoded
    return CheckedUpdate(tensors=tensors, weight=float(update.weight), raw=update)


def _checked_together(update: Update, expect: Expectation) -> CheckedUpdate | None:
    """The checked update, every tensor read and checked in a few torch calls for all of them, where the codec
    reads sparse payloads together (registry.sparse_views) and nothing is wrong; else None, and `check_update`
    checks tensor by tensor, which names the first problem. It accepts exactly what that accepts, with the same
    decoded tensors, and adds `CheckedUpdate.order` (found by the repeat check).

    Why: the per-tensor checks cost a few small torch calls each (a `unique`, an `isfinite`, a max, ...), and
    for a model of many tensors those calls, not the arithmetic, were most of a check (bench/push_cost.py)."""
    payloads = list(update.payloads.values())
    if not registry.is_sparse(expect.codec):
        return None
    for name, payload in update.payloads.items():
        dtype = expect.dtypes[name]
        if (tuple(payload.shape) != expect.shapes[name] or payload.codec != expect.codec
                or payload.dtype not in (dtype, torch.promote_types(dtype, torch.float32))):
            return None
    reads = registry.sparse_views(payloads)
    if reads is None or not reads:
        return None
    # In range: 0 <= index < its tensor's numel.
    for (indices, _), payload in zip(reads, payloads, strict=True):
        if indices.numel():
            low, high = torch.aminmax(indices)
            if int(low) < 0 or int(high) >= payload.numel:
                return None
    # Laid end to end, tensor by tensor (int32 while they fit: half the bytes to sort), every coordinate of every
    # tensor once: no two equal once sorted.
    starts = [0, *itertools.accumulate(p.numel for p in payloads)]
    wide = torch.int64 if starts[-1] > torch.iinfo(torch.int32).max else torch.int32
    flat = torch.cat([(i + at).to(wide) for (i, _), at in zip(reads, starts, strict=False)])
    order = argsort(flat)
    flat = flat[order]
    if bool((flat[1:] == flat[:-1]).any()):
        return None
    values = torch.cat([v.to(torch.float32) for _, v in reads])
    if values.numel() and not (bool(torch.isfinite(values).all()) and float(values.abs().max()) <= expect.max_abs):
        return None
    tensors = {name: Decoded(tuple(p.shape), v.to(torch.float32), i)
               for (name, p), (i, v) in zip(update.payloads.items(), reads, strict=True)}
    return CheckedUpdate(tensors=tensors, weight=float(update.weight), raw=update, order=order.to(wide))
