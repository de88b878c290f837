"""The outer optimizer kernels match torch.optim.SGD and never touch their inputs."""

from __future__ import annotations

import pytest
import torch

from protocols.outer import nesterov_sgd

SHAPES = {"w": (4, 3), "b": (3,)}


def _params(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=gen) for name, shape in SHAPES.items()}


def _grad_sequence(steps: int) -> list[dict[str, torch.Tensor]]:
    return [_params(100 + i) for i in range(steps)]


@pytest.mark.parametrize(("lr", "momentum", "nesterov"), [(0.7, 0.9, True), (0.3, 0.5, False), (1.0, 0.0, False)])
def test_matches_torch_sgd_over_several_steps(lr: float, momentum: float, nesterov: bool) -> None:
    params = _params(0)
    torch_params = {name: torch.nn.Parameter(p.clone()) for name, p in params.items()}
    opt = torch.optim.SGD(list(torch_params.values()), lr=lr, momentum=momentum, nesterov=nesterov)
    buf: dict[str, torch.Tensor] = {}
    for grads in _grad_sequence(6):
        for name, p in torch_params.items():
            p.grad = grads[name].clone()
        opt.step()
        params, buf = nesterov_sgd(params, grads, buf, lr=lr, momentum=momentum, nesterov=nesterov)
        for name, p in torch_params.items():
            # Same operations in the same order as torch's single-tensor SGD: equal bit for bit.
            assert torch.equal(params[name], p.detach())


def test_first_step_buffer_is_the_gradient_and_later_steps_follow_the_recurrence() -> None:
    params = {"x": torch.zeros(2)}
    g1, g2 = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 0.5])
    p1, buf1 = nesterov_sgd(params, {"x": g1}, {}, lr=0.1, momentum=0.9)
    assert torch.equal(buf1["x"], g1)
    # Nesterov direction on the first step: g + 0.9 * g.
    torch.testing.assert_close(p1["x"], -0.1 * (g1 + 0.9 * g1))
    p2, buf2 = nesterov_sgd(p1, {"x": g2}, buf1, lr=0.1, momentum=0.9)
    torch.testing.assert_close(buf2["x"], 0.9 * g1 + g2)
    torch.testing.assert_close(p2["x"], p1["x"] - 0.1 * (g2 + 0.9 * buf2["x"]))


def test_inputs_are_not_mutated_and_outputs_do_not_alias_them() -> None:
    params = _params(0)
    grads, buf = _params(1), _params(2)
    snapshot = [{n: t.clone() for n, t in d.items()} for d in (params, grads, buf)]
    new_params, new_buf = nesterov_sgd(params, grads, buf, lr=0.7, momentum=0.9)
    for before, after in zip(snapshot, (params, grads, buf), strict=True):
        for name in before:
            assert torch.equal(before[name], after[name])
    for name in params:
        assert new_params[name].data_ptr() != params[name].data_ptr()
        assert new_buf[name].data_ptr() not in {buf[name].data_ptr(), grads[name].data_ptr()}


def test_parameters_without_gradient_keep_value_and_momentum() -> None:
    params = _params(0)
    buf = {"b": torch.full((3,), 5.0)}
    new_params, new_buf = nesterov_sgd(params, {"w": torch.ones(4, 3)}, buf, lr=0.7, momentum=0.9)
    assert torch.equal(new_params["b"], params["b"])
    assert new_params["b"].data_ptr() != params["b"].data_ptr()
    assert torch.equal(new_buf["b"], buf["b"])
    assert not torch.equal(new_params["w"], params["w"])
    assert list(new_params) == list(params)


def test_low_precision_parameters_keep_their_dtype_and_a_float32_buffer() -> None:
    params = {"x": torch.ones(3, dtype=torch.bfloat16)}
    new_params, new_buf = nesterov_sgd(params, {"x": torch.full((3,), 0.5)}, {}, lr=0.7, momentum=0.9)
    assert new_params["x"].dtype == torch.bfloat16
    assert new_buf["x"].dtype == torch.float32


def test_bad_input_names_the_problem() -> None:
    params = _params(0)
    with pytest.raises(ValueError, match="'w' has shape"):
        nesterov_sgd(params, {"w": torch.zeros(3, 4)}, {}, lr=0.7, momentum=0.9)
    with pytest.raises(ValueError, match=r"not parameters: \['z'\]"):
        nesterov_sgd(params, {"z": torch.zeros(1)}, {}, lr=0.7, momentum=0.9)
    with pytest.raises(ValueError, match="lr must be >= 0"):
        nesterov_sgd(params, {}, {}, lr=-1.0, momentum=0.9)
    with pytest.raises(ValueError, match="momentum must be >= 0"):
        nesterov_sgd(params, {}, {}, lr=0.7, momentum=-0.1)
