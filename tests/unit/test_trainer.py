"""InnerTrainer: learning, schedule, clipping, persistent step count, parameter I/O."""

from __future__ import annotations

import itertools
import math
import re

import pytest
import torch

from protocols.config import ModelConfig, TrainConfig
from worker.data import load_corpus
from worker.model import GPT
from worker.trainer import InnerTrainer, lr_at, params_digest

TINY = ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=32)


def make_trainer(total_steps: int = 100, **train: float) -> InnerTrainer:
    corpus = load_corpus(0.05, 60_000)
    torch.manual_seed(0)
    model = GPT(TINY, corpus.tokenizer.vocab_size)
    sampler = corpus.shard(0, 1, "iid", seed=0).sampler(8, TINY.block_size)
    cfg = TrainConfig(**{"lr": 3e-3, "warmup_steps": 10, **train})  # type: ignore[arg-type]
    return InnerTrainer(model, sampler, cfg, total_steps)


def test_loss_decreases_over_100_steps() -> None:
    trainer = make_trainer(100)
    eval_batches = load_corpus(0.05, 60_000).eval_batches(8, TINY.block_size, 4)
    before = trainer.evaluate(eval_batches)
    losses = trainer.train(100)
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 - 0.5
    assert trainer.evaluate(eval_batches) < before - 0.5


def test_schedule_warms_up_linearly_then_decays_to_the_floor() -> None:
    cfg = TrainConfig(lr=1e-2, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg, 100) == pytest.approx(1e-3)
    assert lr_at(9, cfg, 100) == pytest.approx(1e-2)  # warmup ends at the peak
    assert lr_at(10, cfg, 100) == pytest.approx(1e-2)  # cosine starts at the peak
    assert lr_at(99, cfg, 100) == pytest.approx(1e-3)  # last step at min_lr_ratio * lr
    assert lr_at(500, cfg, 100) == pytest.approx(1e-3)
    mid = 10 + (99 - 10) / 2
    assert lr_at(int(mid), cfg, 100) > 0.55e-2 > lr_at(int(mid) + 1, cfg, 100)  # half way ~ (lr+floor)/2
    decay = [lr_at(s, cfg, 100) for s in range(10, 100)]
    assert all(a >= b for a, b in itertools.pairwise(decay))
    assert lr_at(0, TrainConfig(lr=1e-2, warmup_steps=0), 100) == pytest.approx(1e-2)


def test_step_count_and_schedule_carry_across_calls() -> None:
    trainer = make_trainer(50)
    trainer.train(3)
    trainer.train(4)
    assert trainer.step_count == 7
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(lr_at(6, trainer.cfg, 50))
    assert trainer.current_lr() == pytest.approx(lr_at(7, trainer.cfg, 50))


def _grad_norm(trainer: InnerTrainer) -> float:
    grads = [p.grad.norm() for p in trainer.module.parameters() if p.grad is not None]
    return float(torch.stack(grads).norm())


def test_clipping_bounds_the_applied_gradient_norm() -> None:
    trainer = make_trainer(grad_clip=1e-3)
    trainer.step()
    assert trainer.last_grad_norm > 1e-3  # so clipping really acted
    assert _grad_norm(trainer) == pytest.approx(1e-3, rel=1e-4)
    unclipped = make_trainer(grad_clip=0.0)
    unclipped.step()
    assert _grad_norm(unclipped) == pytest.approx(unclipped.last_grad_norm, rel=1e-5)


def test_weight_decay_applies_to_2d_weights_only() -> None:
    trainer = make_trainer(weight_decay=0.1)
    decay, no_decay = trainer.optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and all(p.dim() == 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(trainer.module.parameters()))


def test_params_round_trip_through_load_params() -> None:
    trainer = make_trainer()
    saved = trainer.params()
    assert all(t.device.type == "cpu" and not t.requires_grad for t in saved.values())
    trainer.train(2)
    assert params_digest(trainer.params()) != params_digest(saved)
    trainer.load_params(saved)
    assert params_digest(trainer.params()) == params_digest(saved)
    saved["wte.weight"].zero_()  # the copies are detached from the model
    assert trainer.module.get_parameter("wte.weight").abs().sum() > 0


def test_load_params_rejects_wrong_names_and_shapes() -> None:
    trainer = make_trainer()
    params = trainer.params()
    with pytest.raises(ValueError, match=re.escape("missing ['ln_f.bias']")):
        trainer.load_params({k: v for k, v in params.items() if k != "ln_f.bias"})
    with pytest.raises(ValueError, match=r"ln_f\.bias has shape"):
        trainer.load_params({**params, "ln_f.bias": torch.zeros(3)})


def test_evaluate_is_side_effect_free() -> None:
    trainer = make_trainer()
    batches = load_corpus(0.05, 60_000).eval_batches(4, TINY.block_size, 2)
    digest = params_digest(trainer.params())
    first = trainer.evaluate(batches)
    assert trainer.evaluate(batches) == first and math.isfinite(first)
    assert trainer.module.training and params_digest(trainer.params()) == digest


def test_digest_sees_a_single_changed_element() -> None:
    params = {"a": torch.zeros(4), "b": torch.ones(2, 2)}
    changed = {"a": torch.zeros(4), "b": torch.ones(2, 2)}
    changed["b"][1, 1] = 1.0000001
    assert params_digest(params) == params_digest({k: v.clone() for k, v in params.items()})
    assert params_digest(params) != params_digest(changed)
