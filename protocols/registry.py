"""From a run config to the Protocol object the coordinator and workers share.

Each protocol that runs through the coordinator registers one builder in `_BUILDERS`
(`"sparseloco": SparseLoCo.from_config`, ...); nothing else here changes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from protocols.base import Protocol
from protocols.config import RunConfig
from protocols.diloco import DiLoCo
from protocols.econtrol import EControl
from protocols.sparseloco import SparseLoCo

# kind -> builder taking that kind's `protocol` config section.
_BUILDERS: dict[str, Callable[[Any], Protocol]] = {
    "diloco": DiLoCo.from_config,
    "sparseloco": SparseLoCo.from_config,
    "econtrol": EControl.from_config,
}

# Kinds that are valid configs but never reach the coordinator's aggregation path.
_NOT_COORDINATED = {
    "ddp": "protocol.kind 'ddp' does not run through the coordinator: workers all-reduce gradients every "
    "step with torch DistributedDataParallel, so there is no Protocol to build",
}


def build_protocol(cfg: RunConfig) -> Protocol:
    """The Protocol for `cfg.protocol.kind`; ValueError for kinds the coordinator does not run."""
    kind = cfg.protocol.kind
    if kind in _NOT_COORDINATED:
        raise ValueError(_NOT_COORDINATED[kind])
    builder = _BUILDERS.get(kind)
    if builder is None:
        raise ValueError(f"protocol.kind {kind!r} has no builder; known: {sorted(_BUILDERS)}")
    return builder(cfg.protocol)
