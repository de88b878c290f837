"""DP-SGD for federated clients through `opacus`: the budget planned before a run, each client's privacy
ledger, and the local steps themselves.

Mechanism (Abadi et al., "Deep Learning with Differential Privacy", arXiv:1607.00133). Each local step takes a
batch of the client's examples, computes every example's gradient (opacus `GradSampleModule`), clips each to
L2 norm C = `max_grad_norm` over all trained parameters together, sums them, adds N(0, (sigma C)^2) noise to
every coordinate and divides by the expected batch size (opacus `DPOptimizer`); the wrapped optimizer then
steps on that gradient. The guarantee is example-level (epsilon, delta)-DP of a client's own data, against
everything computed from its updates (the server, other clients, whoever reads the model).

Sampling. Each task draws a client's batches (`worker/federated/tasks.py`): digits as shuffled passes over the
client's samples cut into batches (the last of a pass may be short), Shakespeare as windows at uniformly random
starts in the client's text, `batch_size` of them (fewer for a client with fewer windows). Neither is Poisson
sampling; the accountant is given the sampling rate q = batch_size / client examples, the standard approximation
(Opacus's own accountant does the same when `poisson_sampling=False`). A batch larger than the expected size
would break it and is refused; a smaller one only spends less.

Accounting. `epsilon_for` / `ClientAccountant.epsilon` run a fresh Opacus accountant (`rdp`: Renyi DP,
Mironov 2017; `prv`: privacy random variables, Gopi et al. 2021) over a history of (sigma, q, steps).
`ClientAccountant` is that history alone: a client that trains with the same (sigma, q) every round keeps a
single entry, so the ledger of 10,000 clients stays a few hundred kilobytes and pickles as is.

Budget (`plan`, `DPBudget`). The noise multiplier is fixed before the run for the worst case: a client that
takes part in every planned round, `steps_per_round` steps each. Client sampling only lowers what a client
spends, so the target holds whatever clients are drawn. A target that needs sigma above
`dp.max_noise_multiplier`, or an explicit `dp.noise_multiplier` whose worst case spends more than
`dp.epsilon`, is a `ConfigError` raised before anything trains.

How opacus meets lowband's models (`dp_local_steps`). opacus hooks every module that owns a parameter
requiring grad: for an `nn.Linear` (the tiny MLP; with peft LoRA, the adapter factors `lora_A.default` and
`lora_B.default` inside peft's `lora.Linear` wrapper, whose base layer is frozen) it has an exact per-sample
rule that handles (B, T, C) inputs; frozen modules (the GPT's embeddings, tied head, LayerNorms and base
weights) get no hook and cost nothing; a trainable module opacus has no rule for falls back to its functorch
(`torch.func.vmap`) path. `F.scaled_dot_product_attention` owns no parameters, so nothing hooks it. The GPT's
loss is the mean over B * T tokens, i.e. the mean over the batch of per-sequence means, which is what
`loss_reduction="mean"` assumes: the per-sample gradient is that of one sequence's mean token loss. When the
first adapter's input does not require grad (frozen embeddings), torch warns that the full backward hook fires
on outputs only; opacus needs only the output gradient, so the warning is silenced. After the steps the
hooks and every attribute opacus added are removed, so the same model object serves the next client.

The noise comes from the caller's `torch.Generator` (reproducible simulation), not a cryptographically secure
source; a deployment against a real adversary would use opacus's `secure_mode`.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from protocols.dp_config import DPConfig
from protocols.settings import ConfigError

Batch = tuple[torch.Tensor, torch.Tensor]
Accountant = Literal["rdp", "prv"]
History = list[tuple[float, float, int]]  # (noise multiplier, sampling rate, steps), Opacus's own format

# Attributes opacus leaves behind that its own cleanup does not remove: on modules (activations captured by
# a forward without a backward, the inferred batch length) and on parameters (DPOptimizer's clipped sum).
_MODULE_ATTRS = ("activations", "max_batch_len")
_PARAM_ATTRS = ("summed_grad", "grad_sample", "_forward_counter", "_current_grad_sample", "_norm_sample")
_HOOK_WARNING = "Full backward hook is firing when gradients are computed with respect to module outputs"
# The first adapter's input comes from frozen embeddings, so torch warns that its backward hook sees no input
# gradient; opacus needs only the output gradient. Filtered once here: `catch_warnings` is not thread-safe,
# and the simulator's pool trains clients on several threads.
warnings.filterwarnings("ignore", message=_HOOK_WARNING)


def sample_rate(batch_size: int, examples: int) -> float:
    """The accountant's sampling rate q for fixed-size batches of `batch_size` out of a client's `examples`."""
    if examples < 1 or batch_size < 1:
        raise ConfigError(f"dp: a client needs examples >= 1 and data.batch_size >= 1 (got {examples}, {batch_size})")
    return min(1.0, batch_size / examples)


def epsilon_of(history: Iterable[tuple[float, float, int]], delta: float, accountant: Accountant = "rdp") -> float:
    """Epsilon at `delta` after the (noise, sample_rate, steps) entries of `history`, by a fresh Opacus
    accountant; 0 for an empty history, inf when an entry has no noise."""
    from opacus.accountants import create_accountant

    entries = [(float(s), float(q), int(n)) for s, q, n in history if n > 0]
    if not entries:
        return 0.0
    if any(s <= 0 for s, _, _ in entries):
        return math.inf  # no noise, no privacy (and the accountants divide by sigma)
    acc = create_accountant(mechanism=accountant)
    acc.history = entries
    return float(acc.get_epsilon(delta=delta))


def epsilon_for(noise: float, sample_rate: float, steps: int, delta: float, accountant: Accountant = "rdp") -> float:
    """Epsilon at `delta` after `steps` DP-SGD steps of noise multiplier `noise` at sampling rate `sample_rate`."""
    return epsilon_of([(noise, sample_rate, steps)], delta, accountant)


def _check_plan_inputs(q: float, steps_per_round: int, rounds: int) -> None:
    if not 0.0 < q <= 1.0:
        raise ConfigError(f"dp: the sampling rate (batch size / client examples) must be in (0, 1], got {q}")
    if steps_per_round < 1 or rounds < 1:
        raise ConfigError(f"dp: the plan needs steps_per_round >= 1 and rounds >= 1, got {steps_per_round}, {rounds}")


def _needed_noise(cfg: DPConfig, q: float, steps: int) -> float | None:
    """The sigma that meets `cfg`'s target over `steps` (Opacus's search), or None when none does."""
    from opacus.accountants.utils import get_noise_multiplier

    try:
        with warnings.catch_warnings():  # "optimal order is the largest alpha", all along the search
            warnings.simplefilter("ignore", UserWarning)
            return float(get_noise_multiplier(target_epsilon=cfg.epsilon, target_delta=cfg.delta, sample_rate=q,
                                              steps=steps, accountant=cfg.accountant,
                                              epsilon_tolerance=min(0.01, 0.01 * cfg.epsilon)))
    except (ValueError, ArithmeticError, RuntimeError):
        return None


def _affordable_rounds(cfg: DPConfig, noise: float, q: float, steps_per_round: int, rounds: int) -> str:
    """How many rounds (< `rounds`) a client in every round can take at `noise` within the target, in words."""
    lo, hi = 0, rounds  # eps(lo rounds) <= target < eps(hi rounds)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if epsilon_for(noise, q, mid * steps_per_round, cfg.delta, cfg.accountant) <= cfg.epsilon:
                lo = mid
            else:
                hi = mid
    return f"at most {lo} rounds fit" if lo else "not even one round fits"


def plan(cfg: DPConfig, sample_rate: float, steps_per_round: int, rounds: int) -> float:
    """The noise multiplier of a run: `cfg.noise_multiplier` if given and within budget, else the smallest
    sigma (to 1% of epsilon) whose worst case spends at most `cfg.epsilon` at `cfg.delta`.

    The worst case is a client in every one of `rounds` rounds, taking `steps_per_round` steps at `sample_rate`
    each time: `steps_per_round * rounds` steps in all. Whatever the client sampling, no client spends more, so
    the budget holds, provided `sample_rate` is the largest any client has (its smallest client's) and no client
    takes more than `steps_per_round` steps a round; the ledgers record what each spent. Raises `ConfigError`,
    naming epsilon, delta, rounds and steps and what would be needed, when the derived sigma exceeds
    `cfg.max_noise_multiplier` or the explicit one is too small.
    `cfg.enabled` is the caller's business: this plans whatever it is given."""
    q = sample_rate
    _check_plan_inputs(q, steps_per_round, rounds)
    steps = steps_per_round * rounds
    where = (f"target epsilon {cfg.epsilon:g} at delta {cfg.delta:g} over {rounds} rounds x {steps_per_round} "
             f"local steps = {steps} steps at sampling rate {q:.4g} (the worst case: a client in every round, "
             f"{cfg.accountant} accountant)")
    if cfg.noise_multiplier is not None:
        spent = epsilon_for(cfg.noise_multiplier, q, steps, cfg.delta, cfg.accountant)
        if spent > cfg.epsilon:
            needed = _needed_noise(cfg, q, steps)
            need = (f"dp.noise_multiplier >= {needed:.3f} (or dp.noise_multiplier unset to derive it)"
                    if needed is not None else f"more noise than the {cfg.accountant} accountant can certify")
            fits = _affordable_rounds(cfg, cfg.noise_multiplier, q, steps_per_round, rounds)
            raise ConfigError(f"dp.noise_multiplier {cfg.noise_multiplier:g} would spend epsilon {spent:.3g}, over the "
                              f"{where}: it needs {need}, a larger dp.epsilon, or fewer rounds ({fits} at this "
                              f"noise)")
        return float(cfg.noise_multiplier)
    ceiling = cfg.max_noise_multiplier
    with warnings.catch_warnings():  # at large noise RDP's best order is its largest: a looser bound, still valid
        warnings.simplefilter("ignore", UserWarning)
        at_ceiling = epsilon_for(ceiling, q, steps, cfg.delta, cfg.accountant)
    if at_ceiling > cfg.epsilon:
        needed = _needed_noise(cfg, q, steps)
        need = (f"it needs noise multiplier {needed:.3f}, above dp.max_noise_multiplier {ceiling:g} (which spends "
                f"epsilon {at_ceiling:.3g}; with more noise the updates would be mostly noise)" if needed is not None
                else f"no noise multiplier meets it under the {cfg.accountant} accountant (dp.max_noise_multiplier "
                f"{ceiling:g} spends epsilon {at_ceiling:.3g})")
        fits = _affordable_rounds(cfg, ceiling, q, steps_per_round, rounds)
        raise ConfigError(f"dp: the {where} cannot be met: {need}; raise dp.epsilon, lower the rounds or local "
                          f"steps ({fits}), or lower the sampling rate (more examples per client, smaller batches)")
    noise = _needed_noise(cfg, q, steps)
    if noise is None or noise > ceiling:  # the search stops just under the target: the ceiling itself fits
        noise = ceiling
    return noise


@dataclass(frozen=True)
class DPBudget:
    """A run's privacy plan, fixed before it starts (see `plan`): what summary.json reports of it."""

    noise_multiplier: float
    sample_rate: float
    steps_per_round: int
    rounds: int
    epsilon: float  # the target
    delta: float
    accountant: Accountant
    max_grad_norm: float
    planned_epsilon: float  # what the worst-case client spends; <= epsilon

    @classmethod
    def make(cls, cfg: DPConfig, sample_rate: float, steps_per_round: int, rounds: int) -> DPBudget:
        noise = plan(cfg, sample_rate, steps_per_round, rounds)
        spent = epsilon_for(noise, sample_rate, steps_per_round * rounds, cfg.delta, cfg.accountant)
        return cls(noise, sample_rate, steps_per_round, rounds, cfg.epsilon, cfg.delta, cfg.accountant,
                   cfg.max_grad_norm, spent)

    def summary(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(slots=True)
class ClientAccountant:
    """One client's privacy ledger: the (noise multiplier, sampling rate, steps) it has spent, in Opacus's
    history format, consecutive entries with the same noise and rate merged. Small and picklable."""

    history: History = field(default_factory=list)

    def spend(self, noise: float, sample_rate: float, steps: int) -> None:
        if steps < 0 or not 0.0 < sample_rate <= 1.0 or noise < 0:
            raise ValueError(f"cannot spend noise {noise}, sampling rate {sample_rate}, steps {steps}")
        if steps == 0:
            return
        if self.history and self.history[-1][:2] == (float(noise), float(sample_rate)):
            last = self.history[-1]
            self.history[-1] = (last[0], last[1], last[2] + int(steps))
        else:
            self.history.append((float(noise), float(sample_rate), int(steps)))

    @property
    def steps(self) -> int:
        return sum(n for _, _, n in self.history)

    def epsilon(self, delta: float, accountant: Accountant = "rdp") -> float:
        """Epsilon spent so far at `delta`."""
        return epsilon_of(self.history, delta, accountant)


def _scrub(model: nn.Module, had: dict[int, set[str]]) -> None:
    """Remove what opacus attached to `model`'s modules and parameters (its own cleanup leaves some); `had`:
    each module's attributes before opacus, which stay."""
    for module in model.modules():
        for attr in _MODULE_ATTRS:
            if attr in module.__dict__ and attr not in had.get(id(module), set()):
                delattr(module, attr)
    for p in model.parameters():
        for attr in _PARAM_ATTRS:
            if hasattr(p, attr):
                delattr(p, attr)


def dp_local_steps(
    model: nn.Module,
    optimizer_factory: Callable[[], torch.optim.Optimizer],
    batches: Iterable[Batch],
    noise_multiplier: float,
    max_grad_norm: float,
    expected_batch_size: int,
    generator: torch.Generator | None = None,
) -> list[float]:
    """DP-SGD steps of `model` (forward `model(x, targets) -> (logits, mean loss)`), one per batch; the batch
    losses in order. See the module docstring.

    `optimizer_factory()` builds the inner optimizer over the parameters to train; only those are privatized:
    per-sample gradients are clipped jointly over them to `max_grad_norm`, noised with `noise_multiplier *
    max_grad_norm` from `generator` (on the parameters' device) and averaged over `expected_batch_size`.
    Parameters that require grad but are not in the optimizer (tensors a protocol freezes on clients) are
    frozen for the duration, so they get neither a gradient nor a per-sample one. Afterwards the model is as
    it was (training mode, requires_grad flags, no hooks or opacus attributes, `.grad` None) except for the
    updated weights, ready for the next client."""
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    if noise_multiplier < 0 or max_grad_norm <= 0 or expected_batch_size < 1:
        raise ValueError(f"dp_local_steps needs noise_multiplier >= 0, max_grad_norm > 0, expected_batch_size >= 1; "
                         f"got {noise_multiplier}, {max_grad_norm}, {expected_batch_size}")
    optimizer = optimizer_factory()
    chosen = {id(p) for group in optimizer.param_groups for p in group["params"] if p.requires_grad}
    if not chosen:
        raise ValueError("dp_local_steps: the optimizer holds no parameter that requires grad")
    held_back = [p for p in model.parameters() if p.requires_grad and id(p) not in chosen]
    owned = {id(p) for p in model.parameters()}
    if chosen - owned:
        raise ValueError("dp_local_steps: the optimizer holds parameters that are not the model's")
    was_training = model.training
    device = next(iter(model.parameters())).device
    had = {id(m): set(m.__dict__) & set(_MODULE_ATTRS) for m in model.modules()}
    gsm: Any = None
    losses: list[float] = []
    try:
        for p in held_back:
            p.requires_grad_(False)
        model.train()
        gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=True)
        dp_opt = DPOptimizer(optimizer, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                             expected_batch_size=expected_batch_size, loss_reduction="mean", generator=generator)
        for x, y in batches:
            if len(x) > expected_batch_size:
                raise ValueError(f"a batch of {len(x)} examples exceeds expected_batch_size "
                                 f"{expected_batch_size}: the accountant's sampling rate would be wrong")
            dp_opt.zero_grad(set_to_none=True)
            _, loss = gsm(x.to(device), y.to(device))
            if loss is None:
                raise ValueError("the model returned no loss: dp_local_steps needs model(x, targets)")
            loss.backward()
            dp_opt.step()
            losses.append(float(loss.detach()))
    finally:
        if gsm is not None:
            gsm._close()  # opacus: remove the hooks and the grad_sample attributes
        _scrub(model, had)
        for p in model.parameters():
            p.grad = None
        for p in held_back:
            p.requires_grad_(True)
        model.train(was_training)
    return losses
