"""The run's metrics as TensorBoard scalars, written into the run directory (`tensorboard --logdir runs` shows
every run under its name).

`TensorBoardScalars` is a round listener of `CoordinatorRun`: each closed round adds its losses, bytes per
worker (totals, and the protocol / control / state split), tokens, duration and compute utilization, at step =
the round; the writer is closed after the run's last round. It uses `torch.utils.tensorboard.SummaryWriter`,
which needs the `tensorboard` package; without it `tensorboard_listener` returns None and the run goes on with
metrics.jsonl alone.

Runs without a coordinator (DDP, the all-gather transport) get their eval points written once they finish
(`write_eval_scalars`), at step = the optimizer step the point names.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any

from coordinator.round_record import RoundRecord
from coordinator.state import CoordinatorState
from coordinator.traffic import traffic_of, traffic_per_worker

log = logging.getLogger(__name__)

# tag -> the RoundRecord field it plots (None values are skipped: e.g. a round without an evaluation).
RECORD_TAGS = {
    "loss/train": "train_loss",
    "loss/eval": "eval_loss",
    "tokens": "tokens",
    "bytes_per_worker/sent": "bytes_sent_per_worker",
    "bytes_per_worker/received": "bytes_received_per_worker",
    "round/seconds": "seconds",
    "round/compute_utilization": "compute_utilization",
}
# tag -> the traffic split's key, means over every worker that joined (coordinator/traffic.py).
TRAFFIC_TAGS = {f"traffic_per_worker/{key}": key for key in
                ("protocol_sent", "protocol_received", "control_sent", "control_received", "state_sent",
                 "state_received")}


def tensorboard_available() -> bool:
    return importlib.util.find_spec("tensorboard") is not None


class TensorBoardScalars:
    def __init__(self, log_dir: str | Path, state: CoordinatorState) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer: Any = SummaryWriter(log_dir=str(log_dir))
        self.state = state

    def __call__(self, record: RoundRecord) -> None:
        step = record.round
        for tag, key in RECORD_TAGS.items():
            value = getattr(record, key)
            if value is not None:
                self.writer.add_scalar(tag, float(value), step)
        split = traffic_per_worker([traffic_of(m) for m in self.state.members_copy()])
        for tag, key in TRAFFIC_TAGS.items():
            self.writer.add_scalar(tag, split[key], step)
        self.writer.flush()  # a live `tensorboard` sees every round as it closes
        if record.round + 1 >= self.state.total_rounds:
            self.close()  # the last round: let the writer's thread and file go

    def close(self) -> None:
        self.writer.close()


def tensorboard_listener(log_dir: str | Path, state: CoordinatorState) -> TensorBoardScalars | None:
    """A round listener writing TensorBoard scalars into `log_dir`; None when `tensorboard` is not installed."""
    if not tensorboard_available():
        log.warning("the tensorboard package is not installed: no TensorBoard scalars for %s", log_dir)
        return None
    return TensorBoardScalars(log_dir, state)


def write_eval_scalars(log_dir: str | Path, points: list[dict[str, Any]]) -> bool:
    """Eval points of a run without a coordinator ({"step", "eval_loss", optional "train_loss", "bytes_sent",
    "bytes_received"}) as TensorBoard scalars; False (nothing written) when tensorboard is not installed."""
    if not tensorboard_available():
        return False
    from torch.utils.tensorboard import SummaryWriter

    writer: Any = SummaryWriter(log_dir=str(log_dir))
    for point in points:
        step = int(point["step"])
        writer.add_scalar("loss/eval", float(point["eval_loss"]), step)
        if point.get("train_loss") is not None:
            writer.add_scalar("loss/train", float(point["train_loss"]), step)
        if point.get("bytes_sent") is not None:
            writer.add_scalar("bytes_per_worker/sent", float(point["bytes_sent"]), step)
            received = point.get("bytes_received", point["bytes_sent"])  # a ring all-reduce: as much each way
            writer.add_scalar("bytes_per_worker/received", float(received), step)
    writer.close()
    return True
