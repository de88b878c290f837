"""The coordinator's phases: WAITING (for workers and an initial state) -> TRAINING -> FINISHED."""

from __future__ import annotations

from enum import Enum


class Phase(Enum):
    WAITING = "waiting"
    TRAINING = "training"
    FINISHED = "finished"
