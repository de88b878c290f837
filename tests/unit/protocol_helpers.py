"""Helpers shared by the protocol unit tests (round checks, downlink, DiLoCo, SparseLoCo, EControl).

Every helper drives the production code paths (`check_update`, `RoundAggregator`, `apply_aggregate`);
none re-implements a protocol, so a test built on them still tests the protocol.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from protocols.base import Accumulator, CheckedUpdate, Protocol, Update
from protocols.check import DEFAULT_MAX_UPDATE_RATIO, check_update, expectation
from protocols.downlink import Downlink
from protocols.replica import Params, Replica
from protocols.round import RoundAggregator

AnyProtocol = Protocol[Any, Any]


def rand(seed: int, shape: tuple[int, ...], scale: float = 1.0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A reproducible normal tensor (each test names its seeds, so failures replay exactly)."""
    return scale * torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def clone(params: Params) -> Params:
    return {name: t.clone() for name, t in params.items()}


def checked(protocol: AnyProtocol, replica: Replica, worker_id: str, update: Update, acc: Accumulator,
            max_update_ratio: float = DEFAULT_MAX_UPDATE_RATIO) -> CheckedUpdate:
    """`update` checked exactly as a `RoundAggregator` would before folding it into `acc`."""
    return check_update(worker_id, update, expectation(protocol, replica, type(acc).view, max_update_ratio))


def fold(protocol: AnyProtocol, replica: Replica, acc: Accumulator, worker_id: str, update: Update,
         max_update_ratio: float = DEFAULT_MAX_UPDATE_RATIO) -> None:
    """Check, then fold one update into a bare accumulator (what `RoundAggregator.submit` does)."""
    acc.fold(worker_id, checked(protocol, replica, worker_id, update, acc, max_update_ratio))


def dense_aggregator(protocol: AnyProtocol, params: Params, **replica_fields: Any) -> RoundAggregator:
    """A round aggregator whose downlink applies exactly the aggregate (`Downlink("dense")`)."""
    return RoundAggregator(protocol, Downlink("dense"), Replica(0, clone(params), **replica_fields))


def locals_from(params: Params, deltas: Params) -> Params:
    """The local parameters of a worker whose pseudo-gradient is `deltas` (local = global - delta)."""
    return {name: params[name] - d for name, d in deltas.items()}


def tensor_state(value: Any, path: str = "") -> dict[str, Any]:
    """A deep, cloned, flat view of every tensor and scalar reachable from `value` (dataclasses, dicts,
    lists, tuples), keyed by path; container lengths are recorded so an added entry shows up too."""
    if isinstance(value, torch.Tensor):
        return {path: value.detach().clone()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        out: dict[str, Any] = {f"{path}#len": len(value)}
        for key, item in value.items():
            out.update(tensor_state(item, f"{path}/{key}"))
        return out
    if isinstance(value, list | tuple):
        out = {f"{path}#len": len(value)}
        for i, item in enumerate(value):
            out.update(tensor_state(item, f"{path}[{i}]"))
        return out
    return {path: value}


def assert_same_state(before: dict[str, Any], after: dict[str, Any]) -> None:
    """Bit-for-bit equality of two `tensor_state` views (dtype included)."""
    assert before.keys() == after.keys()
    for key, old in before.items():
        new = after[key]
        if isinstance(old, torch.Tensor):
            assert isinstance(new, torch.Tensor) and old.dtype == new.dtype and torch.equal(old, new), key
        else:
            assert old == new, key


def assert_replicas_equal(a: Replica, b: Replica) -> None:
    """Bit-identical replicas: same digest, and (for a readable failure) the same tensors."""
    assert (a.round, a.outer_steps) == (b.round, b.outer_steps)
    for part in ("params", "momentum", "downlink_shift"):
        ta, tb = getattr(a, part), getattr(b, part)
        assert ta.keys() == tb.keys(), part
        for name in ta:
            assert torch.equal(ta[name], tb[name]), f"{part}/{name}"
    assert a.digest() == b.digest()
