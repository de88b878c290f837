"""On-arrival overlap (`overlap.mode: on_arrival`, protocols/arrival.py, Streaming DiLoCo's overlap): the merge's
identity, its config, and in-process runs against the synchronous protocol they must reduce to."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from deploy.inproc import run_inproc
from protocols.arrival import outer_shift
from protocols.registry import build_protocol
from protocols.settings import ConfigError
from tests.conftest import tiny_config
from worker.loop import WorkerResult
from worker.session import Session

ROUNDS, INNER = 4, 4
CASES: dict[str, dict[str, Any]] = {
    "diloco": {"kind": "diloco", "outer_lr": 0.7, "outer_momentum": 0.5},
    "sparseloco": {"kind": "sparseloco", "compression": {"chunk": 256, "density": 0.0625}},
    "econtrol": {"kind": "econtrol", "compression": {"chunk": 256}},
}


def _config(case: str, overlap: dict[str, Any] | None) -> Any:
    return tiny_config(
        protocol={**CASES[case], "inner_steps": INNER, "overlap": overlap or {"enabled": False}},
        train={"steps": INNER * ROUNDS, "lr": 1e-2, "warmup_steps": 1, "eval_batches": 2, "eval_every_steps": 100},
        cluster={"workers": 2, "fold_order": "worker"},
    )


def _run(case: str, overlap: dict[str, Any] | None) -> tuple[dict[str, Any], list[WorkerResult]]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_inproc(_config(case, overlap))
    finally:
        torch.set_num_threads(threads)


def _on_arrival(delay: int | None) -> dict[str, Any]:
    return {"enabled": True, "mode": "on_arrival", "delay_steps": delay}


def test_the_merge_keeps_the_local_progress_on_top_of_the_new_replica() -> None:
    gen = torch.Generator().manual_seed(0)
    before = {"w": torch.randn(3, 4, generator=gen), "b": torch.randn(4, generator=gen)}
    after = {n: t + 0.1 * torch.randn(t.shape, generator=gen) for n, t in before.items()}
    local = {n: t + 0.01 * torch.randn(t.shape, generator=gen) for n, t in before.items()}
    shift = outer_shift(before, after)
    for name in before:
        merged = local[name] + shift[name]
        torch.testing.assert_close(merged - after[name], local[name] - before[name])  # the progress, kept
    assert all(not s.any() for s in outer_shift(before, before).values())  # no outer step: no shift


def test_the_merge_refuses_replicas_that_do_not_match() -> None:
    w = {"w": torch.zeros(2, 2)}
    with pytest.raises(ValueError, match=r"name different tensors: \['v', 'w'\]"):
        outer_shift(w, {"v": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match=r"w has shape \(2, 2\) before, \(4,\) after"):
        outer_shift(w, {"w": torch.zeros(4)})


def test_shifting_the_trainer_moves_its_weights_and_keeps_its_optimizer_state() -> None:
    session = Session.build(_config("diloco", None), 0, 2, evaluates=False)
    session.trainer.step()
    state_before = {k: v for k, v in session.trainer.optimizer.state_dict()["state"].items()}
    params = session.params()
    shift = {n: torch.full_like(p, 0.5) for n, p in params.items()}
    session.trainer.shift_params(shift)
    for name, p in session.params().items():
        torch.testing.assert_close(p, params[name] + 0.5)
    assert session.trainer.optimizer.state_dict()["state"].keys() == state_before.keys()
    wrong = dict(shift)
    first = next(iter(wrong))
    wrong[first] = torch.zeros(1)
    with pytest.raises(ValueError, match=f"shift_params: {first} has shape"):
        session.trainer.shift_params(wrong)
    for name, p in session.params().items():  # nothing partial was applied
        torch.testing.assert_close(p, params[name] + 0.5)


@pytest.mark.parametrize("case", list(CASES))
def test_merging_before_the_first_inner_step_is_the_synchronous_protocol_bit_for_bit(case: str) -> None:
    (sync, sync_results), (arrival, results) = _run(case, None), _run(case, _on_arrival(0))
    assert build_protocol(_config(case, _on_arrival(0))).merges_on_arrival
    assert not build_protocol(_config(case, _on_arrival(0))).overlapped  # the aggregator's step is synchronous
    assert arrival["state_hash"] == sync["state_hash"]
    for a, s in zip(results, sync_results, strict=True):
        assert a.state_hashes == s.state_hashes and a.param_hash == s.param_hash
        assert a.merged_after_steps == [0] * (ROUNDS - 1)  # every round but the first merges its predecessor's


@pytest.mark.parametrize("case", ["diloco", "sparseloco"])
def test_a_later_merge_changes_the_trajectory_and_every_replica_stays_the_coordinators(case: str) -> None:
    (sync, _), (arrival, results) = _run(case, None), _run(case, _on_arrival(2))
    assert arrival["state_hash"] != sync["state_hash"]  # two inner steps ran before the outer step was merged
    assert arrival["rounds"] == ROUNDS
    for r in results:
        assert r.rounds == ROUNDS and (r.resyncs, r.stale_updates) == (0, 0)
        assert r.merged_after_steps == [2] * (ROUNDS - 1)
        assert r.state_hashes == results[0].state_hashes and r.state_hashes[-1] == arrival["state_hash"]
        assert r.final_eval_loss is not None and r.final_eval_loss < r.evals[0]["eval_loss"] - 0.1


def test_merging_whenever_the_aggregate_arrives_records_when_it_did() -> None:
    arrival, results = _run("sparseloco", _on_arrival(None))
    for r in results:
        assert r.rounds == ROUNDS and (r.resyncs, r.stale_updates) == (0, 0)
        assert len(r.merged_after_steps) == ROUNDS - 1 and all(0 <= m <= INNER for m in r.merged_after_steps)
        assert r.state_hashes[-1] == arrival["state_hash"]


def test_on_arrival_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match=r"overlap\.eager is a variant of CO2's stale step"):
        _config("diloco", {"enabled": True, "mode": "on_arrival", "eager": True})
    with pytest.raises(ConfigError, match=r"overlap\.delay_steps is the on_arrival mode's"):
        _config("diloco", {"enabled": True, "delay_steps": 2})
    with pytest.raises(ConfigError, match=r"delay_steps"):
        _config("diloco", _on_arrival(-1))
    with pytest.raises(ConfigError, match=r"mode"):
        _config("diloco", {"enabled": True, "mode": "later"})
    # Switched off, the mode changes nothing: the synchronous loop and step.
    off = build_protocol(_config("diloco", {"enabled": False, "mode": "on_arrival"}))
    assert not off.merges_on_arrival and not off.overlapped


def test_a_mid_round_merge_leaves_the_rounds_pseudo_gradient_exactly_its_inner_progress(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Every inner step adds the same constant to every weight, so a round's inner progress is INNER times it.
    The merge moves the local weights by the outer step, so each update made against the merged replica is the
    progress alone; without the merge's shift, rounds after the first would also carry the outer step."""
    from protocols.compressed import AveragingProtocol
    from worker.trainer import InnerTrainer

    step_size = 1e-3

    @torch.no_grad()
    def constant_step(self: InnerTrainer) -> float:
        for p in self.module.parameters():
            if p.requires_grad:
                p.add_(step_size)
        self.step_count += 1
        return 1.0

    gaps: list[float] = []
    make_update = AveragingProtocol.make_update

    def recorded(self: AveragingProtocol, local: Any, replica: Any, state: Any) -> Any:
        gaps.append(max(float((replica[n] - local[n] + INNER * step_size).abs().max()) for n in local))
        return make_update(self, local, replica, state)

    monkeypatch.setattr(InnerTrainer, "step", constant_step)
    monkeypatch.setattr(AveragingProtocol, "make_update", recorded)
    arrival, results = _run("diloco", _on_arrival(2))
    assert arrival["rounds"] == ROUNDS and all(r.merged_after_steps == [2] * (ROUNDS - 1) for r in results)
    assert len(gaps) == 2 * ROUNDS and max(gaps) < 1e-5, gaps


def test_a_replica_corrupted_by_a_mid_round_merge_resyncs_and_the_run_ends_where_a_clean_one_does() -> None:
    from worker.faults import Faults

    cfg = _config("diloco", _on_arrival(2))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        clean_summary, clean = run_inproc(cfg)
        summary, results = run_inproc(cfg, faults=[Faults(corrupt_replica_at_round=1), Faults()])
    finally:
        torch.set_num_threads(threads)
    bad, good = sorted(results, key=lambda r: r.worker_id)
    assert (bad.resyncs, good.resyncs) == (1, 0) and bad.stale_updates == 0
    # The merge moved the weights by the step to the resynced (the aggregator's) replica: nothing else changed.
    assert bad.state_hashes == good.state_hashes == sorted(clean, key=lambda r: r.worker_id)[0].state_hashes
    assert summary["state_hash"] == clean_summary["state_hash"]
