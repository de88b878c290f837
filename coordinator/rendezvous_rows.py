"""The rendezvous' bookkeeping, without its lock: a member (`Peer`), the check of a report's metrics, and
the metrics.jsonl row of a round (coordinator/rendezvous.py says when it is written and what it holds)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from coordinator.errors import Code, Rejected
from protocols.gossip.sketch import consensus_distance_from_sketches

# Cumulative per-worker counters a report may carry (each is also kept on the `Peer`).
COUNTERS = ("bytes_sent", "bytes_received", "tokens", "steps")
SKETCH_PREFIX = "sketch."


@dataclass
class Peer:
    worker_id: str
    index: int
    hostname: str
    address: str  # where its peer service listens ("" in process)
    last_seen: float
    alive: bool = True
    round: int = -1  # the highest round it asked the roster for
    reported: int = -1  # the highest round it reported
    step: int = 0
    loss: float | None = None
    eval_loss: float | None = None
    final_eval_loss: float | None = None
    bytes_sent: int = 0
    bytes_received: int = 0
    tokens: int = 0
    steps: int = 0
    session_digest: str = ""  # SHA-256 of its session credential (coordinator/sessions.py), never the credential


def sketch_of(metrics: dict[str, float]) -> list[float]:
    """The values of `sketch.0`..`sketch.{k-1}` in order ([] when the report has none)."""
    return [metrics[f"{SKETCH_PREFIX}{i}"] for i in range(sum(k.startswith(SKETCH_PREFIX) for k in metrics))]


def check_metrics(worker_id: str, metrics: dict[str, float], others: dict[str, dict[str, float]]) -> None:
    """Refuse a report with a non-finite value, a negative counter, a gappy sketch, or a sketch whose length
    differs from the other reports of its round (`others`: worker -> its report)."""
    for key, value in metrics.items():
        if not isinstance(value, int | float) or not math.isfinite(value):
            raise Rejected(Code.INVALID_ARGUMENT, f"worker {worker_id} reported metric {key!r} = {value}: "
                                                  f"metrics must be finite numbers")
        if key in COUNTERS and value < 0:
            raise Rejected(Code.INVALID_ARGUMENT, f"worker {worker_id} reported counter {key!r} = {value} < 0")
    keys = sorted(k for k in metrics if k.startswith(SKETCH_PREFIX))
    expected = sorted(f"{SKETCH_PREFIX}{i}" for i in range(len(keys)))
    if keys != expected:
        raise Rejected(Code.INVALID_ARGUMENT, f"worker {worker_id}'s sketch keys must be {SKETCH_PREFIX}0.."
                                              f"{SKETCH_PREFIX}{len(keys) - 1}, got {keys}")
    lengths = {len(sketch_of(m)) for m in others.values()} - {0}
    if keys and lengths and lengths != {len(keys)}:
        raise Rejected(Code.INVALID_ARGUMENT, f"worker {worker_id} reported a sketch of {len(keys)} values; "
                                              f"the others of this round have {sorted(lengths)}")


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def round_row(round_: int, total_rounds: int, reports: dict[str, dict[str, float]], members: list[Peer],
              seconds: float) -> dict[str, Any]:
    """The row of `round_` from its reports (worker -> metrics). Counters: each member's value in its report
    of this round, else the latest it reported (a worker that left); per worker = over every member."""

    def counter(peer: Peer, key: str) -> float:
        return float(reports.get(peer.worker_id, {}).get(key, getattr(peer, key)))

    ordered = sorted(reports)
    losses = {w: reports[w]["train_loss"] for w in ordered if "train_loss" in reports[w]}
    evals = {w: reports[w]["eval_loss"] for w in ordered if "eval_loss" in reports[w]}
    sketches = [s for s in (sketch_of(reports[w]) for w in ordered) if s]
    n = max(len(members), 1)
    sent = sum(counter(p, "bytes_sent") for p in members)
    received = sum(counter(p, "bytes_received") for p in members)
    return {
        "event": "final" if round_ == total_rounds else "round",
        "round": round_,
        "workers": ordered,
        "train_loss": _mean(list(losses.values())),
        "eval_loss": _mean(list(evals.values())),
        "loss_per_worker": losses,
        "eval_loss_per_worker": evals,
        "consensus_distance": consensus_distance_from_sketches(sketches) if sketches else None,
        "tokens": sum(counter(p, "tokens") for p in members),
        "bytes_sent_per_worker": sent / n,
        "bytes_received_per_worker": received / n,
        "bytes_total_per_worker": (sent + received) / n,
        "seconds": seconds,
    }
