"""The run directory `runs/<name>/`: resolved config (token removed), metrics.jsonl, checkpoint, summary.json.

Files are replaced atomically (temp file, fsync, rename) so a crash never leaves a torn checkpoint or
summary behind. metrics.jsonl is one JSON row per line, each written with a single `write`: a fresh run
starts it empty, a resumed run (`resume`) only ever appends to it.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from coordinator.checkpoint import ResumePoint, atomic_write, load_checkpoint, redacted
from coordinator.round_record import RoundRecord
from protocols.config import RunConfig, to_yaml
from protocols.replica import Replica

__all__ = ["RunDir", "load_checkpoint"]
log = logging.getLogger(__name__)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


class RunDir:
    def __init__(self, root: str | Path, cfg: RunConfig, resume: ResumePoint | None = None) -> None:
        self.path = Path(root)
        self.path.mkdir(parents=True, exist_ok=True)
        self.cfg = cfg
        self.worker_tokens = False  # whether the coordinator admits workers by their own tokens (recorded as such)
        _atomic_write_bytes(self.path / "config.yaml", to_yaml(redacted(cfg)).encode())
        self.metrics = self.path / "metrics.jsonl"
        if resume is None:
            self.metrics.write_text("")
        else:
            self._continue_metrics(resume)

    def _continue_metrics(self, resume: ResumePoint) -> None:
        """Make metrics.jsonl hold every round before the checkpoint's exactly once, by appending only: a
        fragment torn by a crash mid-write is cut off, and the round the checkpoint closed is appended when
        the crash came between the checkpoint and its row (the checkpoint is written first)."""
        if self.metrics.exists():
            data = self.metrics.read_bytes()
            whole = data.rfind(b"\n") + 1  # bytes up to the end of the last whole row
            if whole < len(data):
                log.warning("%s: dropping a row torn by the crash (%d bytes)", self.metrics, len(data) - whole)
                with self.metrics.open("r+b") as f:
                    f.truncate(whole)
        logged = {row.get("round") for row in self.rows() if row.get("event") == "round"}
        record = resume.checkpoint.get("record")
        if record is not None and record["round"] not in logged:
            self.log("round", run_id=resume.run_id, **record)

    def rows(self) -> list[dict[str, Any]]:
        if not self.metrics.exists():
            return []
        return [json.loads(line) for line in self.metrics.read_text().splitlines() if line.strip()]

    def log(self, event: str, **fields: Any) -> None:
        line = (json.dumps({"event": event, **fields}) + "\n").encode()
        fd = os.open(self.metrics, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)  # one write: a crash leaves the row whole or torn at the end, never interleaved
        finally:
            os.close(fd)

    def log_round(self, record: RoundRecord, run_id: str = "") -> None:
        self.log("round", run_id=run_id, **asdict(record))

    def save_checkpoint(self, replica: Replica, aggregator_state: Any, downlink_state: Any, run_id: str,
                        base_digest: str = "", members: dict[str, dict[str, Any]] | None = None,
                        record: RoundRecord | None = None, elapsed_s: float = 0.0) -> Path:
        """The replica after its last round plus what only the aggregator keeps (shifts, downlink residual) and,
        under adapters, the digest of the frozen base they train against (`params` then holds the adapter
        factors only: `lowband export` merges them into a plain checkpoint). `params` is kept at the top level
        so `lowband sample` reads any checkpoint alike. With the run id, the membership, the round's record and
        the config (token removed) it is everything `--resume` needs (coordinator/checkpoint.py)."""
        path = self.path / "checkpoint.pt"
        contents = {
            "round": replica.round, "run_id": run_id, "params": replica.params, "replica": replica,
            "aggregator_state": aggregator_state, "downlink_state": downlink_state, "base_digest": base_digest,
            "members": members or {}, "record": asdict(record) if record is not None else None,
            "elapsed_s": elapsed_s, "config": redacted(self.cfg).model_dump(mode="json"),
            "token_required": bool(self.cfg.cluster.token),
            "worker_tokens_required": self.worker_tokens,  # whether it had any, never one of them
        }
        atomic_write(path, lambda f: torch.save(contents, f))
        return path

    def write_summary(self, summary: dict[str, Any]) -> Path:
        path = self.path / "summary.json"
        _atomic_write_bytes(path, (json.dumps(summary, indent=2) + "\n").encode())
        return path
