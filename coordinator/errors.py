"""The coordinator's refusals: `protocols.refusals`, where the in-process transport can see them too."""

from __future__ import annotations

from protocols.refusals import Code, Rejected, is_early, is_stale

__all__ = ["Code", "Rejected", "is_early", "is_stale"]
