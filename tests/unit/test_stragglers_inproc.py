"""Straggler controls in SparseLoCo, CO2 (DiLoCo with overlap) and on-arrival SparseLoCo, on the in-process
transport: the coordinator's state machine and worker threads (no sockets), the tiny GPT, a worker slowed by
`faults.stragglers`. Asserted on the recorded rounds and results, never on times."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from deploy.inproc import run_inproc
from protocols.base import Update
from tests.conftest import tiny_config
from worker.loop import WorkerResult
from worker.transports.inproc import InprocTransport
from worker.transports.star import PushOutcome

H, ROUNDS = 6, 4
LATE_ROUNDS = 12
PROTOCOLS: dict[str, dict[str, Any]] = {
    "sparseloco": {"kind": "sparseloco", "inner_steps": H},
    "co2": {"kind": "diloco", "inner_steps": H, "outer_momentum": 0.0, "overlap": {"enabled": True}},
    "arrival": {"kind": "sparseloco", "inner_steps": H,
                "overlap": {"enabled": True, "mode": "on_arrival", "delay_steps": 2}},
}


def run(tmp_path: Path, protocol: dict[str, Any], cluster: dict[str, Any], factors: list[float], rounds: int = ROUNDS,
        link: dict[str, Any] | None = None) -> tuple[list[dict[str, Any]], list[WorkerResult]]:
    cfg = tiny_config(
        protocol=protocol, link=link,
        train={"steps": rounds * H, "lr": 1e-2, "warmup_steps": 1, "eval_batches": 2, "eval_every_steps": 1000},
        cluster={"workers": len(factors), "transport": "inproc", "heartbeat_timeout_s": 600, **cluster},
        faults={"stragglers": {"factors": factors}},
    )
    _, results = run_inproc(cfg, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len({r.param_hash for r in results}) == 1  # every replica ends the same, stragglers included
    return [row for row in rows if row["event"] == "round"], results


@pytest.mark.parametrize("name", sorted(PROTOCOLS))
def test_adaptive_inner_steps_keep_the_straggler_in_every_round_with_fewer_steps(tmp_path: Path, name: str) -> None:
    # Behind an emulated link (a fast one): the target time reaches the loop through the Link wrapper too.
    records, results = run(tmp_path, {**PROTOCOLS[name], "adaptive_inner_steps": True}, {}, [3, 1],
                           link={"bandwidth_mbps": 1000.0})
    slow = next(r for r in results if r.slowdown == 3.0)
    fast = next(r for r in results if r.slowdown == 1.0)
    assert [rec["round"] for rec in records] == list(range(ROUNDS))
    assert all(rec["closed_by"] == "all" and len(rec["workers"]) == 2 for rec in records)
    # No speed is known before the first round; then each fits its steps in H of the fastest step time
    # measured (the fast worker too may fit a step or two fewer when its own steps wander).
    assert fast.steps_per_round[0] == slow.steps_per_round[0] == H
    assert sum(slow.steps_per_round[1:]) < sum(fast.steps_per_round[1:])
    for rec in records:  # what each worker reported is what it trained: steps x batch 8 x block 32
        assert rec["tokens_per_worker"][slow.worker_id] == slow.steps_per_round[rec["round"]] * 8 * 32


class AlwaysLate(InprocTransport):
    """The real in-process transport, holding each update until the round it is for has closed: a straggler
    that is late every round whatever the machine's load (a slowdown factor alone made lateness a matter of
    timing, and under a loaded CI its updates sometimes all came in on time)."""

    def _push(self, round_: int, update: Update, metrics: dict[str, float]) -> PushOutcome:
        give_up = time.monotonic() + 60.0
        while self.state.round <= round_ and time.monotonic() < give_up:
            time.sleep(0.002)
        return super()._push(round_, update, metrics)


@pytest.mark.parametrize("name", sorted(PROTOCOLS))
def test_late_updates_are_folded_with_their_staleness_weight(tmp_path: Path, name: str,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    cluster = {"min_workers": 2, "round_deadline_s": 0.05, "late": "stale", "stale_weight": 0.5}
    # w0 pushes each update only once its round has closed without it; the other two make every quorum.
    monkeypatch.setattr("deploy.inproc.InprocTransport",
                        lambda service, token, name: (AlwaysLate if name == "w0" else InprocTransport)(
                            service, token, name))
    records, results = run(tmp_path, PROTOCOLS[name], cluster, [1, 1, 1], rounds=LATE_ROUNDS)
    assert [rec["round"] for rec in records] == list(range(LATE_ROUNDS))
    assert all("w0" not in rec["workers"] for rec in records)
    late = next(r for r in results if r.worker_id == "w0")
    # Every update it sent was late (it may sit out a round it fell too far behind in, and resync), and each
    # was folded into a later open round, except those pushed after the last round closed: one, or under a
    # loaded machine a few (the fast workers can finish the run while w0 still waits for CPU).
    assert late.stale_updates == late.rounds >= LATE_ROUNDS // 2
    assert late.late_folded >= LATE_ROUNDS // 2
    folded = [(sender, rec["round"], weight) for rec in records for sender, weight in rec["late_folded"].items()]
    for r in results:
        assert sum(sender.startswith(f"{r.worker_id}@") for sender, _, _ in folded) == r.late_folded
        # Only an update that missed every round (after the last one closed) was dropped.
        assert r.dropped_tokens == (r.stale_updates - r.late_folded) * H * 8 * 32
    for sender, folded_into, weight in folded:
        pushed_for = int(sender.partition("@")[2])
        assert weight == pytest.approx(0.5 ** (folded_into - pushed_for))
    assert all(rec["late_dropped"] == [] for rec in records)
