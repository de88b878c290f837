"""DP-SGD for federated clients (worker/federated/dp.py): the accountant agrees with Opacus, the plan meets
its target or refuses, per-sample clipping is exact, the noise follows the generator, LoRA adapters train
privately, and the model comes back clean."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from opacus.accountants import PRVAccountant, RDPAccountant
from pydantic import ValidationError
from torch import nn

from protocols.dp_config import DPConfig
from protocols.settings import ConfigError
from tests.conftest import tiny_config
from worker.federated.dp import (
    ClientAccountant,
    DPBudget,
    dp_local_steps,
    epsilon_for,
    plan,
    sample_rate,
)
from worker.models import build_model

VOCAB = 65


class TinyMLP(nn.Module):
    """64-64-10 classifier with lowband's forward convention: model(x, targets) -> (logits, mean loss)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        logits = self.fc2(torch.relu(self.fc1(x)))
        return logits, None if targets is None else F.cross_entropy(logits, targets)


def mlp_batch(n: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 64, generator=g) * 3, torch.randint(10, (n,), generator=g)


def gpt_batch(n: int = 4, seed: int = 0, block: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(VOCAB, (n, block + 1), generator=g)
    return x[:, :-1], x[:, 1:]


def lora_gpt(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(tiny_config(lowrank={"method": "lora", "rank": 4}), VOCAB)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def sgd(model: nn.Module, lr: float = 1.0):  # type: ignore[no-untyped-def]
    return lambda: torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)


def clipped_mean_by_loop(model: nn.Module, x: torch.Tensor, y: torch.Tensor, c: float) -> tuple[dict, torch.Tensor]:
    """Per-sample gradients by one backward per example, clipped jointly to c as opacus does, averaged."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    norms = []
    for i in range(len(x)):
        _, loss = model(x[i : i + 1], y[i : i + 1])
        grads = torch.autograd.grad(loss, list(params.values()))
        norm = torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads]).double()).float()
        norms.append(norm)
        factor = min(1.0, c / (float(norm) + 1e-6))
        for n, g in zip(params, grads, strict=True):
            total[n] += factor * g
    return {n: t / len(x) for n, t in total.items()}, torch.stack(norms)


# --- accounting ---------------------------------------------------------------------------------------


def test_epsilon_for_and_client_accountant_match_opacus_rdp_stepped_by_hand() -> None:
    noise, q, steps, delta = 1.1, 0.02, 300, 1e-5
    reference = RDPAccountant()
    for _ in range(steps):
        reference.step(noise_multiplier=noise, sample_rate=q)
    expected = reference.get_epsilon(delta=delta)
    assert 0 < expected < 100
    assert epsilon_for(noise, q, steps, delta, "rdp") == pytest.approx(expected, rel=1e-12)
    client = ClientAccountant()
    for _ in range(3):  # three rounds of 100 local steps: one merged entry
        client.spend(noise, q, 100)
    assert client.history == [(noise, q, steps)]
    assert client.epsilon(delta) == pytest.approx(expected, rel=1e-12)
    # A later round at another noise and rate: a second entry, composed as Opacus composes.
    client.spend(2.0, 0.05, 40)
    for _ in range(40):
        reference.step(noise_multiplier=2.0, sample_rate=0.05)
    assert client.epsilon(delta, "rdp") == pytest.approx(reference.get_epsilon(delta=delta), rel=1e-12)
    assert client.epsilon(delta) > expected
    assert client.steps == steps + 40


def test_prv_accountant_matches_opacus_and_is_tighter_than_rdp() -> None:
    noise, q, steps, delta = 1.0, 0.05, 100, 1e-5
    reference = PRVAccountant()
    for _ in range(steps):
        reference.step(noise_multiplier=noise, sample_rate=q)
    prv = epsilon_for(noise, q, steps, delta, "prv")
    assert prv == pytest.approx(reference.get_epsilon(delta=delta), rel=1e-9)
    assert prv < epsilon_for(noise, q, steps, delta, "rdp")


def test_client_accountant_is_small_picklable_and_empty_spends_nothing() -> None:
    client = ClientAccountant()
    assert client.epsilon(1e-5) == 0.0 and client.steps == 0
    assert bool(client)  # `saved.get("dp") or ClientAccountant()` must keep an empty ledger
    for _ in range(50):
        client.spend(1.3, 0.01, 10)
    restored = pickle.loads(pickle.dumps(client))
    assert restored == client and len(restored.history) == 1
    assert len(pickle.dumps(client)) < 200
    with pytest.raises(ValueError):
        client.spend(1.0, 1.5, 1)


# --- planning -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", [0.5, 3.0, 8.0])
def test_plan_derives_noise_that_spends_at_most_the_target_and_close_to_it(target: float) -> None:
    cfg = DPConfig(enabled=True, epsilon=target, delta=1e-5)
    q, per_round, rounds = 0.05, 10, 20
    noise = plan(cfg, q, per_round, rounds)
    spent = epsilon_for(noise, q, per_round * rounds, cfg.delta)
    assert spent <= target
    assert spent >= 0.95 * target
    # Slightly less noise would overspend: the plan is not needlessly noisy.
    assert epsilon_for(noise * 0.97, q, per_round * rounds, cfg.delta) > spent
    budget = DPBudget.make(cfg, q, per_round, rounds)
    assert budget.noise_multiplier == noise and budget.planned_epsilon == pytest.approx(spent)
    assert budget.summary()["epsilon"] == target


def test_plan_refuses_a_budget_no_allowed_noise_meets_naming_epsilon_delta_rounds_steps() -> None:
    cfg = DPConfig(enabled=True, epsilon=0.01, delta=1e-5)
    with pytest.raises(ConfigError) as err:
        plan(cfg, 1.0, 10, 100)  # 1000 full-batch steps for epsilon 0.01
    msg = str(err.value)
    assert "epsilon 0.01" in msg and "delta 1e-05" in msg
    assert "100 rounds" in msg and "1000 steps" in msg
    assert "max_noise_multiplier 20" in msg and "not even one round fits" in msg
    # Reachable, but only with more noise than allowed: the message says how much, and how many rounds fit.
    reachable = r"needs noise multiplier 4\d\.\d+, above dp\.max_noise_multiplier 20 \(which .*at most 2\d\d rounds fit"
    with pytest.raises(ConfigError, match=reachable):
        plan(DPConfig(enabled=True, epsilon=1.0), 0.1, 10, 1000)


def test_plan_refuses_an_explicit_noise_multiplier_too_small_for_the_target() -> None:
    cfg = DPConfig(enabled=True, epsilon=1.0, noise_multiplier=0.5)
    with pytest.raises(ConfigError, match=r"dp\.noise_multiplier 0\.5 would spend epsilon .* target epsilon 1 "):
        plan(cfg, 0.1, 10, 10)
    # The same multiplier over a budget it does meet is returned unchanged.
    loose = DPConfig(enabled=True, epsilon=50.0, noise_multiplier=0.8)
    assert plan(loose, 0.1, 10, 10) == 0.8
    assert epsilon_for(0.8, 0.1, 100, loose.delta) <= 50.0


def test_plan_and_config_reject_impossible_inputs() -> None:
    with pytest.raises(ConfigError, match="sampling rate"):
        plan(DPConfig(), 1.5, 10, 10)
    with pytest.raises(ConfigError, match="batch_size"):
        sample_rate(0, 100)
    assert sample_rate(32, 16) == 1.0 and sample_rate(8, 100) == 0.08
    with pytest.raises(ValidationError):
        DPConfig(delta=1.0)
    with pytest.raises(ValidationError):
        DPConfig(accountant="gdp")  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        DPConfig(epsilon=6.0, unknown=1)  # type: ignore[call-arg]


# --- the local steps ----------------------------------------------------------------------------------


def test_per_sample_clipping_is_exact_on_an_mlp_at_noise_zero() -> None:
    torch.manual_seed(0)
    model = TinyMLP()
    x, y = mlp_batch(8)
    _, norms = clipped_mean_by_loop(model, x, y, c=1e9)
    c = float(norms.median())  # about half the examples are clipped
    assert (norms > c * 1.01).any() and (norms < c * 0.99).any()
    expected, _ = clipped_mean_by_loop(model, x, y, c)
    plain = {n: g for n, g in zip(dict(model.named_parameters()),
                                  torch.autograd.grad(model(x, y)[1], list(model.parameters())), strict=True)}
    before = snapshot(model)
    dp_local_steps(model, sgd(model, lr=1.0), [(x, y)], noise_multiplier=0.0, max_grad_norm=c,
                   expected_batch_size=8, generator=torch.Generator().manual_seed(0))
    for name, p in model.named_parameters():
        applied = before[name] - p.detach()  # SGD at lr 1: the update is the privatized gradient
        torch.testing.assert_close(applied, expected[name], rtol=1e-5, atol=1e-6)
    # Clipping changed something: the update is not the plain batch gradient.
    assert any(not torch.allclose(before[n] - p.detach(), plain[n], atol=1e-5) for n, p in model.named_parameters())


def test_noise_follows_the_generator() -> None:
    torch.manual_seed(0)
    start = TinyMLP()
    x, y = mlp_batch(8)

    def update(seed: int) -> torch.Tensor:
        model = copy.deepcopy(start)
        dp_local_steps(model, sgd(model, lr=0.1), [(x, y)], noise_multiplier=1.0, max_grad_norm=1.0,
                       expected_batch_size=8, generator=torch.Generator().manual_seed(seed))
        return torch.cat([(p.detach() - q.detach()).flatten() for p, q in zip(model.parameters(), start.parameters(),
                                                                              strict=True)])

    a, b, a_again = update(0), update(1), update(0)
    assert not torch.allclose(a, b)
    assert torch.equal(a, a_again)
    # The noise has the planned size: std sigma * C / batch per coordinate, times lr.
    assert float((a - b).std()) == pytest.approx(0.1 * 1.0 * 1.0 / 8 * 2**0.5, rel=0.1)


def test_dp_steps_on_lora_gpt_train_only_the_adapters_with_exact_per_sample_clipping() -> None:
    model = lora_gpt()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    x, y = gpt_batch(4)
    # One step, noise 0: the update equals the loop's clipped mean (opacus's rule for peft's adapter Linears,
    # fed (B, T, C) activations, with the first adapter's input not requiring grad).
    lora_b = {n: p for n, p in model.named_parameters() if "lora_B" in n}
    with torch.no_grad():  # B starts at zero: give it a value so A has a gradient too
        for p in lora_b.values():
            p.normal_(0, 0.02)
    _, norms = clipped_mean_by_loop(model, x, y, c=1e9)
    c = float(norms.median())
    expected, _ = clipped_mean_by_loop(model, x, y, c)
    before = snapshot(model)
    dp_local_steps(model, sgd(model, lr=1.0), [(x, y)], 0.0, c, 4, torch.Generator().manual_seed(0))
    for name, p in model.named_parameters():
        if name in trainable:
            torch.testing.assert_close(before[name] - p.detach(), expected[name], rtol=1e-4, atol=1e-6)
        else:
            assert torch.equal(p, before[name]), name

    # Repeated steps on one batch at noise 0 lower its loss; frozen weights never move.
    losses = dp_local_steps(model, lambda: torch.optim.Adam([p for p in model.parameters() if p.requires_grad],
                                                            lr=1e-2), [(x, y)] * 15, 0.0, 1.0, 4)
    assert len(losses) == 15 and losses[-1] < losses[0] - 0.05
    for name, p in model.named_parameters():
        assert (name in trainable) != torch.equal(p, before[name]), name


def test_the_model_is_reusable_afterwards_with_no_hooks_or_opacus_state() -> None:
    model = lora_gpt()
    x, y = gpt_batch(4)
    dp_local_steps(model, sgd(model, lr=0.1), [(x, y)] * 2, 1.0, 1.0, 4, torch.Generator().manual_seed(0))
    for module in model.modules():
        assert not module._forward_hooks and not module._backward_hooks and not module._forward_pre_hooks
        assert not hasattr(module, "activations") and not hasattr(module, "autograd_grad_sample_hooks")
    for p in model.parameters():
        assert p.grad is None
        for attr in ("grad_sample", "summed_grad", "_forward_counter", "_current_grad_sample"):
            assert not hasattr(p, attr), attr
    # A plain forward/backward gives ordinary gradients, equal to autograd's.
    params = [p for p in model.parameters() if p.requires_grad]
    reference = torch.autograd.grad(model(x, y)[1], params)
    _, loss = model(x, y)
    loss.backward()
    for p, g in zip(params, reference, strict=True):
        assert p.grad is not None and torch.equal(p.grad, g)
        assert not hasattr(p, "grad_sample")
    # And the next client can run DP steps on the same object.
    model.zero_grad(set_to_none=True)
    assert len(dp_local_steps(model, sgd(model), [(x, y)], 1.0, 1.0, 4, torch.Generator().manual_seed(1))) == 1


def test_parameters_left_out_of_the_optimizer_stay_frozen_and_keep_requires_grad() -> None:
    model = lora_gpt()
    a_names = [n for n, p in model.named_parameters() if "lora_A" in n]
    before = snapshot(model)
    only_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    x, y = gpt_batch(4)
    dp_local_steps(model, lambda: torch.optim.SGD(only_b, lr=0.5), [(x, y)] * 2, 0.5, 1.0, 4,
                   torch.Generator().manual_seed(0))
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], before[n]) and params[n].requires_grad for n in a_names)
    assert any(not torch.equal(p, before[n]) for n, p in params.items() if "lora_B" in n)


def test_a_batch_larger_than_expected_is_refused_and_the_model_is_still_cleaned() -> None:
    torch.manual_seed(0)
    model = TinyMLP()
    x, y = mlp_batch(8)
    with pytest.raises(ValueError, match="exceeds expected_batch_size"):
        dp_local_steps(model, sgd(model), [(x, y)], 1.0, 1.0, 4)
    assert all(not m._forward_hooks and not m._backward_hooks for m in model.modules())
    assert all(not hasattr(p, "grad_sample") for p in model.parameters())
