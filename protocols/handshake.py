"""The join handshake: a worker and a coordinator agree on the software they run and on the run's config.

A worker sends the lowband version it runs with every join and, when it re-joins (after a lost connection,
or a coordinator restarted with `--resume`), the hash of the config it trains with. The coordinator refuses
a different version (two versions may encode, check or aggregate differently) and a different config hash
(the run was resumed with another config: the worker would go on training the old one), each with one line
saying what differs and what to do. Only the fields in `OPERATIONAL_FIELDS` may differ between the two: they
change how a run is operated, not what any worker computes.
"""

from __future__ import annotations

import hashlib
import json
from importlib import metadata
from typing import Any

from protocols.config import RunConfig

# Fields a resumed run may change (coordinator/checkpoint.py) and a re-joining worker need not agree on.
# Everything else shapes the replica, the data or the schedule, and must match.
OPERATIONAL_FIELDS = frozenset({
    "name", "run_dir",
    "cluster.token", "cluster.round_deadline_s", "cluster.heartbeat_interval_s", "cluster.heartbeat_timeout_s",
    "cluster.actor_start_timeout_s", "cluster.cpus_per_worker",
})


def _installed_version() -> str:
    try:
        return metadata.version("lowband")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


LOWBAND_VERSION = _installed_version()


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """A nested dict as {"a.b.c": leaf}."""
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): data}


def config_hash(cfg: RunConfig) -> str:
    """SHA-256 (16 hex digits) of every field of `cfg` but the operational ones, in a canonical form."""
    fields = {k: v for k, v in flatten(cfg.model_dump(mode="json")).items() if k not in OPERATIONAL_FIELDS}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def handshake_problem(worker_version: str, worker_config_hash: str, run_config_hash: str) -> str | None:
    """Why a joining worker must be refused, or None. An empty field was not sent (a first join has no config
    yet; a hand-made client may send no version) and is not judged."""
    if worker_version and worker_version != LOWBAND_VERSION:
        return (f"version mismatch: the worker runs lowband {worker_version[:64]}, the coordinator "
                f"{LOWBAND_VERSION}; install the same version on both")
    if worker_config_hash and worker_config_hash != run_config_hash:
        return (f"config mismatch: the worker trains with config {worker_config_hash[:64]}, the run's is "
                f"{run_config_hash} (the coordinator was restarted with another config?); restart the worker "
                "so that it takes the run's config")
    return None
