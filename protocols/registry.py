"""Every protocol module in `protocols/`, found by name: their config sections and their builders.

A protocol is one file here: it declares its `protocol:` config section (a `ProtocolSettings` subclass
with a `kind` literal) and, when it runs rounds through the coordinator, a `Protocol` subclass whose
`settings` names that section. Importing the modules registers both; nothing here lists them.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from typing import TYPE_CHECKING, Any

import protocols
from protocols.base import Protocol
from protocols.settings import ProtocolSettings

if TYPE_CHECKING:
    from protocols.config import RunConfig

# Modules of the package that are infrastructure, not protocols (importing them registers nothing).
_NOT_PROTOCOLS = {"base", "config", "handshake", "registry", "settings", "wire"}


@functools.cache
def discover() -> tuple[str, ...]:
    """Import every protocol module once; their names."""
    names = []
    for info in pkgutil.iter_modules(protocols.__path__):
        if info.name.startswith("_") or info.name in _NOT_PROTOCOLS:
            continue
        importlib.import_module(f"protocols.{info.name}")
        names.append(info.name)
    return tuple(names)


def settings_models() -> list[type[ProtocolSettings]]:
    """The `protocol:` section of every kind, in a stable order (the config's tagged union)."""
    discover()
    return [ProtocolSettings.registry[kind] for kind in sorted(ProtocolSettings.registry)]


def protocol_class(kind: str) -> type[Protocol[Any, Any]]:
    discover()
    settings = ProtocolSettings.registry.get(kind)
    if settings is None:
        raise ValueError(f"protocol.kind {kind!r} is unknown; known: {sorted(ProtocolSettings.registry)}")
    if not settings.coordinated:
        raise ValueError(
            f"protocol.kind {kind!r} does not run through the coordinator: {settings.__doc__ or ''}".strip()
        )
    cls = Protocol.registry.get(kind)
    if cls is None:
        raise ValueError(f"protocol.kind {kind!r} has settings but no Protocol declares them")
    return cls


def build_protocol(cfg: RunConfig) -> Protocol[Any, Any]:
    """The Protocol for `cfg.protocol.kind`; ValueError for kinds the coordinator does not run."""
    return protocol_class(cfg.protocol.kind).from_settings(cfg.protocol)
