"""The frozen-base check shared by the coordinator's state machine and a gossip run's rendezvous.

Workers that train adapters (worker/lowrank.py) each build the frozen base themselves and state its
SHA-256 before they take part. The first digest stated is the run's; a worker whose base differs would
train adapters against other weights, and averaging those adapters would mean nothing, so it is refused.
"""

from __future__ import annotations

from coordinator.errors import Code, Rejected

HEX = frozenset("0123456789abcdef")


def attested_base(worker_id: str, digest: str, run_digest: str) -> str:
    """The run's base digest once `worker_id` stated `digest` (the first one sets it); Rejected if it differs
    from the run's or is not a SHA-256 hex digest."""
    if len(digest) != 64 or not set(digest) <= HEX:
        raise Rejected(Code.INVALID_ARGUMENT, f"worker {worker_id}: base digest {digest[:80]!r} is not a SHA-256 "
                                              "hex digest")
    if run_digest and digest != run_digest:
        raise Rejected(Code.FAILED_PRECONDITION,
                       f"worker {worker_id}: its frozen base weights (digest {digest[:12]}) differ from the run's "
                       f"({run_digest[:12]}): every worker must build the same base (the same model, init_from and "
                       "lowrank settings)")
    return run_digest or digest
