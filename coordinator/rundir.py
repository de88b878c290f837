"""The run directory `runs/<name>/`: resolved config, metrics.jsonl, checkpoint, summary.json.

Writes are atomic (temp file + rename) so a crash never leaves a torn checkpoint or summary behind.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from coordinator.state import RoundRecord
from protocols.config import RunConfig, to_yaml
from protocols.replica import Replica


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class RunDir:
    def __init__(self, root: str | Path, cfg: RunConfig) -> None:
        self.path = Path(root)
        self.path.mkdir(parents=True, exist_ok=True)
        _atomic_write_bytes(self.path / "config.yaml", to_yaml(cfg).encode())
        self.metrics = self.path / "metrics.jsonl"
        self.metrics.write_text("")

    def log(self, event: str, **fields: Any) -> None:
        with self.metrics.open("a") as f:
            f.write(json.dumps({"event": event, **fields}) + "\n")

    def log_round(self, record: RoundRecord) -> None:
        self.log("round", **asdict(record))

    def save_checkpoint(self, replica: Replica, aggregator_state: Any, downlink_state: Any, run_id: str,
                        base_digest: str = "") -> Path:
        """The replica after its last round plus what only the aggregator keeps (shifts, downlink residual) and,
        under adapters, the digest of the frozen base they train against (`params` then holds the adapter
        factors only: `lowband export` merges them into a plain checkpoint). `params` is kept at the top level
        so `lowband sample` reads any checkpoint alike."""
        path = self.path / "checkpoint.pt"
        tmp = path.with_name("checkpoint.pt.tmp")
        torch.save({"round": replica.round, "run_id": run_id, "params": replica.params, "replica": replica,
                    "aggregator_state": aggregator_state, "downlink_state": downlink_state,
                    "base_digest": base_digest}, tmp)
        os.replace(tmp, path)
        return path

    def write_summary(self, summary: dict[str, Any]) -> Path:
        path = self.path / "summary.json"
        _atomic_write_bytes(path, (json.dumps(summary, indent=2) + "\n").encode())
        return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by `RunDir.save_checkpoint` (our own file, so full unpickling is fine)."""
    ckpt: dict[str, Any] = torch.load(Path(path), map_location="cpu", weights_only=False)
    for key in ("round", "params"):
        if key not in ckpt:
            raise ValueError(f"{path}: not a lowband checkpoint (no {key!r})")
    return ckpt
