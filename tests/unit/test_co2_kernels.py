"""CO2's outer-step kernels (protocols/co2_kernels.py): the paper's identities and this project's choices."""

from __future__ import annotations

import math

import pytest
import torch

from protocols.co2_kernels import co2_outer_step, eager_average, eager_start, staleness_penalty
from protocols.outer import nesterov_sgd


def _params(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(5, 3, generator=gen) * scale, "b": torch.randn(3, generator=gen) * scale}


def test_with_zero_staleness_co2_is_diloco_heavy_ball_bit_for_bit() -> None:
    theta, momentum_co2, momentum_diloco = _params(0), {}, {}
    diloco = dict(theta)
    for step in range(3):
        avg = _params(10 + step, 1e-2)
        # Nothing is stale: the average was taken against the point it is applied to.
        theta, momentum_co2, penalties = co2_outer_step(theta, theta, avg, momentum_co2, 0.7, 0.9, clip=None)
        diloco, momentum_diloco = nesterov_sgd(diloco, avg, momentum_diloco, lr=0.7, momentum=0.9, nesterov=False)
        assert penalties == {"w": 1.0, "b": 1.0}
        for name in theta:
            assert torch.equal(theta[name], diloco[name]), (step, name)
            assert torch.equal(momentum_co2[name], momentum_diloco[name]), (step, name)


def test_the_penalty_is_one_plus_the_gap_over_the_update_size() -> None:
    current, point = torch.tensor([3.0, 4.0]), torch.tensor([0.0, 0.0])  # gap 5
    avg = torch.tensor([0.0, 2.0])  # size 2
    assert staleness_penalty(current, point, avg) == pytest.approx(1 + 5 / 2)
    theta, m, penalties = co2_outer_step({"x": current}, {"x": point}, {"x": avg}, {}, lr=1.0, beta=0.5, clip=None)
    assert penalties["x"] == pytest.approx(3.5)
    assert torch.allclose(m["x"], avg / 3.5)
    assert torch.allclose(theta["x"], current - avg / 3.5)
    # The ablation: no penalty, the stale average at full weight.
    _, m_plain, plain = co2_outer_step({"x": current}, {"x": point}, {"x": avg}, {}, 1.0, 0.5, None, penalty=False)
    assert plain["x"] == 1.0 and torch.equal(m_plain["x"], avg)


def test_clipping_bounds_every_momentum_element_and_is_what_the_step_applies() -> None:
    current = {"x": torch.zeros(4)}
    avg = {"x": torch.tensor([5.0, -5.0, 0.05, -0.05])}
    momentum = {"x": torch.tensor([1.0, -1.0, 0.0, 0.0])}
    phi = 0.1
    theta, m, _ = co2_outer_step(current, current, avg, momentum, lr=2.0, beta=0.9, clip=phi)
    assert bool((m["x"].abs() <= phi).all())
    assert torch.equal(m["x"], torch.tensor([0.1, -0.1, 0.05, -0.05]))
    # Had the clamp's result been discarded, the step would have moved by the unclipped 5.9.
    assert torch.allclose(theta["x"], -2.0 * torch.tensor([0.1, -0.1, 0.05, -0.05]))


def test_tensors_without_an_average_keep_value_and_momentum() -> None:
    current, momentum = _params(1), {"b": torch.ones(3)}
    theta, m, penalties = co2_outer_step(current, current, {"w": torch.ones(5, 3)}, momentum, 0.5, 0.9, None)
    assert torch.equal(theta["b"], current["b"]) and torch.equal(m["b"], momentum["b"])
    assert set(penalties) == {"w"}


def test_bad_hyperparameters_and_names_are_refused() -> None:
    x = {"x": torch.zeros(2)}
    for kwargs, match in (({"lr": 0.0}, "lr > 0"), ({"beta": 1.0}, "beta < 1"), ({"clip": 0.0}, "clip must be > 0")):
        args = {"lr": 1.0, "beta": 0.5, "clip": None, **kwargs}
        with pytest.raises(ValueError, match=match):
            co2_outer_step(x, x, x, {}, **args)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not parameters"):
        co2_outer_step(x, x, {"y": torch.zeros(2)}, {}, 1.0, 0.5, None)


def test_eager_is_synchronous_without_staleness_and_uses_the_fresh_share_otherwise() -> None:
    workers = 4
    fresh = [_params(20 + i, 1e-2) for i in range(workers)]
    sync = {n: sum(f[n] for f in fresh) / workers for n in fresh[0]}
    # No staleness: every worker's stale pseudo-gradient is its fresh one, so eager is the synchronous mean.
    for i in range(workers):
        eager = eager_average(sync, fresh[i], fresh[i], workers)
        assert all(torch.allclose(eager[n], sync[n]) for n in sync)
    # The stale part zero (the others sent nothing yet): only the worker's own fresh share remains.
    zeros = {n: torch.zeros_like(t) for n, t in fresh[0].items()}
    only_own = eager_average(zeros, zeros, fresh[0], workers)
    assert all(torch.allclose(only_own[n], fresh[0][n] / workers) for n in zeros)
    with pytest.raises(ValueError, match="workers must be >= 1"):
        eager_average(zeros, zeros, zeros, 0)


def test_the_penalty_grows_with_the_gap() -> None:
    avg, point = torch.ones(4), torch.zeros(4)
    penalties = [staleness_penalty(point + gap, point, avg) for gap in (0.0, 0.5, 2.0)]
    assert penalties[0] == 1.0 and penalties[0] < penalties[1] < penalties[2]
    assert penalties[2] == pytest.approx(1 + math.sqrt(4 * 4) / 2)


def test_eager_start_moves_the_replica_by_the_fresh_minus_stale_share() -> None:
    params = {"w": torch.tensor([1.0, 2.0, 3.0]), "b": torch.tensor([0.5])}
    fresh = {"w": torch.tensor([0.4, 0.0, -0.4])}
    stale = {"w": torch.tensor([0.2, 0.0, 0.4])}
    start = eager_start(params, fresh, stale, workers=4, lr=0.5)
    # theta - lr * (fresh - stale) / n, element by element; tensors without an update are the replica's.
    assert torch.allclose(start["w"], torch.tensor([1.0 - 0.5 * 0.2 / 4, 2.0, 3.0 + 0.5 * 0.8 / 4]))
    assert start["b"] is params["b"]
    assert torch.equal(eager_start(params, fresh, fresh, workers=4, lr=0.5)["w"], params["w"])  # nothing stale
    # Before the worker's first stale share (its first round) the whole fresh share counts.
    assert torch.allclose(eager_start(params, fresh, {}, workers=2, lr=1.0)["w"], params["w"] - fresh["w"] / 2)
    with pytest.raises(ValueError, match="workers >= 1"):
        eager_start(params, fresh, stale, workers=0, lr=0.5)


def test_eager_start_with_the_update_proxy_takes_the_whole_fresh_outer_step() -> None:
    params = {"w": torch.tensor([1.0, 2.0, 3.0]), "b": torch.tensor([0.5])}
    fresh = {"w": torch.tensor([0.4, 0.0, -0.4])}
    stale = {"w": torch.tensor([0.2, 0.0, 0.4])}
    for own_stale in (stale, {}):  # the stale update plays no part: its average is already in the replica
        start = eager_start(params, fresh, own_stale, workers=4, lr=0.5, proxy="update")
        assert torch.equal(start["w"], torch.add(params["w"], fresh["w"], alpha=-0.5))
        assert start["b"] is params["b"]
    # Every worker sent the same update: its start is where the in-flight average will take the replica.
    assert torch.equal(eager_start(params, fresh, stale, 4, 1.0, proxy="update")["w"], params["w"] - fresh["w"])
    with pytest.raises(ValueError, match="eager proxy"):
        eager_start(params, fresh, stale, workers=4, lr=0.5, proxy="all")
