"""The DDP baseline's config section: gradients all-reduced every step, no outer protocol.

`worker/ddp.py` runs it with torch DistributedDataParallel; there is no `Protocol` to build, so the kind
is registered as not coordinated.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from protocols.settings import ProtocolSettings


class DDPConfig(ProtocolSettings):
    """workers all-reduce gradients every step with torch DistributedDataParallel, so there is no
    Protocol to build."""

    kind: Literal["ddp"] = "ddp"
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    coordinated: ClassVar[bool] = False
