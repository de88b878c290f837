"""Closed rounds are recorded off the state lock (coordinator/recorder.py): a checkpoint that takes long holds
up no heartbeat or push, rounds are written in order, and a failed write is raised by `flush`."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from compression.payload import dense
from coordinator.run import CoordinatorRun
from coordinator.rundir import RunDir
from protocols.base import Update
from protocols.config import PROTOCOL_VERSION
from tests.conftest import tiny_config


def _run(tmp: Path) -> tuple[CoordinatorRun, list[str]]:
    cfg = tiny_config(run_dir=str(tmp / "runs"), train__steps=15)
    run = CoordinatorRun(cfg, run_dir=tmp / "runs" / cfg.name)
    ids = [run.state.join("host", "", PROTOCOL_VERSION).worker_id for _ in range(cfg.cluster.workers)]
    run.state.offer_initial_state(ids[0], "", {"w": dense(torch.ones(3, 2))})
    return run, ids


def _close(run: CoordinatorRun, ids: list[str]) -> None:
    r = run.state.round
    for w in ids:
        run.state.submit(w, "", r, Update({"w": dense(torch.full((3, 2), 0.1))}), {"tokens": 1.0}, 10)


def test_a_slow_checkpoint_holds_up_no_heartbeat_and_rounds_are_recorded_in_order(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    writing, release = threading.Event(), threading.Event()
    save = RunDir.save_checkpoint

    def slow_save(self: RunDir, *args: Any, **kwargs: Any) -> Path:
        writing.set()
        assert release.wait(60)  # hang guard: the test releases it
        return save(self, *args, **kwargs)

    monkeypatch.setattr(RunDir, "save_checkpoint", slow_save)
    run, ids = _run(tmp_path)
    _close(run, ids)  # round 0 closes; its checkpoint blocks in the recorder thread
    assert writing.wait(60)
    beat = threading.Thread(target=run.state.heartbeat, args=(ids[0], "", 5, 2.0, None))
    beat.start()
    beat.join(60)
    assert not beat.is_alive()  # served while the checkpoint is still being written
    _close(run, ids)  # and a whole round more closes meanwhile
    assert run.state.round == 2
    release.set()
    run.recorder.flush()
    rows = [json.loads(line) for line in (run.run_dir.path / "metrics.jsonl").read_text().splitlines()]
    assert [row["round"] for row in rows if row["event"] == "round"] == [0, 1]


def test_a_failed_write_is_raised_by_flush_and_stops_recording(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    def full_disk(self: RunDir, *args: Any, **kwargs: Any) -> Path:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(RunDir, "save_checkpoint", full_disk)
    run, ids = _run(tmp_path)
    _close(run, ids)
    with pytest.raises(RuntimeError, match="No space left on device"):
        run.recorder.flush()
    assert run.state.round == 1  # the run itself went on


def test_the_replica_being_written_is_lent_so_a_close_meanwhile_leaves_it_as_it_closed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The coordinator steps its replica in place at a close (protocols/round.py), except while it is lent: the
    recorder holds round 0's replica while round 1 closes, and writes round 0's values; once the loan is back,
    the next close steps the replica in its own tensors."""
    writing, release = threading.Event(), threading.Event()
    save = RunDir.save_checkpoint
    digests: list[tuple[str, str]] = []

    def slow_save(self: RunDir, replica: Any, *args: Any, **kwargs: Any) -> Path:
        at_entry = replica.digest()
        writing.set()
        assert release.wait(60)  # hang guard: the test releases it
        digests.append((at_entry, replica.digest()))
        return save(self, replica, *args, **kwargs)

    monkeypatch.setattr(RunDir, "save_checkpoint", slow_save)
    run, ids = _run(tmp_path)
    _close(run, ids)
    assert writing.wait(60)
    closed_0 = run.state.state_hash
    _close(run, ids)  # round 1 closes while round 0's replica is being written
    assert run.state.state_hash != closed_0
    release.set()
    run.recorder.flush()
    assert digests[0] == (closed_0, closed_0)  # round 0's replica, untouched by round 1's close
    aggregator = run.state.aggregator
    assert aggregator is not None and not aggregator._lent  # every loan back once written
    pointer = aggregator.replica.params["w"].data_ptr()
    _close(run, ids)
    assert aggregator.replica.params["w"].data_ptr() == pointer  # stepped in place
    run.recorder.flush()
