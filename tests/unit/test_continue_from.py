"""A worker that starts at round r of a run under way (restarted, or late) continues the run's learning-rate
schedule and its shard's batch stream instead of warming up again from step 0."""

from __future__ import annotations

import torch

from tests.conftest import tiny_config
from worker.session import Session
from worker.trainer import lr_at


def test_continue_from_round_puts_the_schedule_and_the_batches_at_the_global_step() -> None:
    torch.set_num_threads(1)
    cfg = tiny_config(train__steps=15, train__warmup_steps=4)  # H = 5: rounds start at steps 0, 5, 10
    fresh = Session.build(cfg, 1, 2, evaluates=False)
    reference = [next(fresh.trainer.sampler) for _ in range(6)]

    restarted = Session.build(cfg, 1, 2, evaluates=False)
    assert restarted.continue_from(1) == 5
    assert restarted.trainer.step_count == 5
    assert restarted.trainer.current_lr() == lr_at(5, cfg.train, cfg.train.steps)  # past warm-up, decaying
    assert restarted.trainer.current_lr() != lr_at(0, cfg.train, cfg.train.steps)  # no second warm-up
    x, y = next(restarted.trainer.sampler)
    assert torch.equal(x, reference[5][0]) and torch.equal(y, reference[5][1])  # the 6th batch, not the 1st
    assert restarted.continue_from(1) == 0  # idempotent; never goes back
    assert restarted.continue_from(0) == 0 and restarted.trainer.step_count == 5
    assert Session.build(cfg, 0, 2, evaluates=False).continue_from(9) == 15  # capped at the step budget
