"""The NoLoCo-style outer step on the gossip average: DiLoCo's Nesterov step on start - average."""

from __future__ import annotations

import torch

from protocols.gossip import gossip_outer_step, pseudo_gradient
from protocols.outer import nesterov_sgd


def _start_and_average() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    start = {"w": torch.randn(4, 3, generator=g), "steps": torch.tensor(10)}
    averaged = {"w": torch.randn(4, 3, generator=g), "steps": torch.tensor(15)}
    return start, averaged


def test_lr_one_without_momentum_takes_the_gossip_average() -> None:
    start, averaged = _start_and_average()
    params, buf = gossip_outer_step(start, averaged, {}, lr=1.0, momentum=0.0)
    torch.testing.assert_close(params["w"], averaged["w"])
    assert params["steps"].item() == 15 and buf == {}  # counters: the node's newest value


def test_momentum_steps_match_torch_sgd_nesterov_on_the_pseudo_gradient() -> None:
    start, averaged = _start_and_average()
    delta = pseudo_gradient(start, averaged)
    assert set(delta) == {"w"} and torch.equal(delta["w"], start["w"] - averaged["w"])
    params, buf = gossip_outer_step(start, averaged, {}, lr=0.7, momentum=0.9)
    again, buf2 = gossip_outer_step(params, averaged, buf, lr=0.7, momentum=0.9)
    # The same two steps through torch's own optimizer.
    p = torch.nn.Parameter(start["w"].clone())
    opt = torch.optim.SGD([p], lr=0.7, momentum=0.9, nesterov=True)
    for _ in range(2):
        p.grad = p.detach() - averaged["w"]
        opt.step()
    torch.testing.assert_close(again["w"], p.detach())
    expected, _ = nesterov_sgd(params, pseudo_gradient(params, averaged), buf, 0.7, 0.9)
    torch.testing.assert_close(again["w"], expected["w"])
    assert not torch.equal(buf2["w"], buf["w"])
