"""Golden loss trajectories (tests/golden): the refactored round loop reproduces the recorded runs.

On the machine kind that recorded them (same torch build, same CPU kernels) every loss and every global
state hash must be bit-identical. Elsewhere float kernels may round differently, so the losses must agree
to 1e-3 relative and the hashes are not compared.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.golden.compute import trajectory
from tests.golden.trajectories import CASES, GOLDEN, machine

RECORDED: dict[str, Any] = json.loads(GOLDEN.read_text())
SAME_MACHINE = RECORDED["machine"] == machine()


@pytest.mark.parametrize("case", list(CASES))
def test_trajectory_matches_the_recording(case: str) -> None:
    want, got = RECORDED["cases"][case], trajectory(case)
    assert len(got) == len(want) == RECORDED["rounds"]
    for w, g in zip(want, got, strict=True):
        if SAME_MACHINE:
            assert g == w, f"{case} round {w['round']} differs from the golden recording"
        else:
            assert g["train_losses"] == pytest.approx(w["train_losses"], rel=1e-3)
            assert g["eval_loss"] == pytest.approx(w["eval_loss"], rel=1e-3)


def test_the_trajectories_move() -> None:
    for case, rounds in RECORDED["cases"].items():
        assert rounds[-1]["eval_loss"] < rounds[0]["eval_loss"], case
        assert len({r["params_hash"] for r in rounds}) == len(rounds), case
