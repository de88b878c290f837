"""Robust aggregation: the kernels' definitions, the config's refusals, and a run where one worker sends
scaled garbage: trimmed mean and median-norm clipping neutralise it, plain averaging does not."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from compression.payload import dense
from deploy.inproc import run_inproc
from protocols.base import CheckedUpdate, Decoded, Update
from protocols.config import ConfigError
from protocols.robust import RobustAccumulator, median_norm_clipped_mean, trimmed_mean
from protocols.settings import RobustConfig
from tests.conftest import tiny_config
from worker.faults import Faults


def test_trimmed_mean_drops_each_coordinates_extremes_and_without_trimming_is_the_weighted_mean() -> None:
    values = torch.tensor([[1.0, -50.0], [2.0, 2.0], [3.0, 3.0], [1000.0, 4.0]])  # [n=4, 2]
    weights = torch.ones(4)
    # k = 1 of each end, per coordinate: [2, 3] and [2, 3] are kept.
    assert torch.equal(trimmed_mean(values, weights, 0.25), torch.tensor([2.5, 2.5]))
    w = torch.tensor([1.0, 2.0, 3.0, 4.0])
    torch.testing.assert_close(trimmed_mean(values, w, 0.0), (values * w[:, None]).sum(0) / w.sum())
    with pytest.raises(ValueError, match="leaves none"):
        trimmed_mean(values[:2], weights[:2], 0.49 + 0.01)


def test_median_norm_clipping_scales_only_the_updates_above_the_median_norm() -> None:
    values = torch.stack([torch.full((3,), 1.0), torch.full((3,), 2.0), torch.full((3,), 100.0)])
    out = median_norm_clipped_mean(values, torch.ones(3))
    # The median norm is 2*sqrt(3): the third update is scaled down to the second, the others kept.
    torch.testing.assert_close(out, torch.full((3,), (1.0 + 2.0 + 2.0) / 3))


def test_the_robust_aggregate_does_not_depend_on_arrival_order() -> None:
    gen = torch.Generator().manual_seed(0)
    tensors = [torch.randn(5, generator=gen) for _ in range(4)]
    updates = [CheckedUpdate({"w": Decoded((5,), t)}, weight=1.0 + i, raw=Update({"w": dense(t)}, 1.0 + i))
               for i, t in enumerate(tensors)]
    for kind in ("trimmed_mean", "median_norm_clip"):
        means = []
        for order in itertools.permutations(range(4)):
            acc = RobustAccumulator(RobustConfig(kind=kind))
            for i in order:
                acc.fold(f"w{i}", updates[i])
            means.append(acc.mean()["w"])
        assert all(torch.allclose(m, means[0], atol=1e-6) for m in means)


def test_robust_aggregation_is_refused_where_it_cannot_apply() -> None:
    with pytest.raises(ConfigError, match=r"robust\.kind 'trimmed_mean' needs an aggregate that averages"):
        tiny_config(protocol={"kind": "econtrol", "robust": {"kind": "trimmed_mean"}})
    with pytest.raises(ConfigError, match=r"use protocol\.clip_to_median_norm"):
        tiny_config(protocol={"kind": "sparseloco", "robust": {"kind": "median_norm_clip"}})


def _final_loss(robust: str, garbage: bool) -> float:
    cfg = tiny_config(
        protocol={"kind": "diloco", "inner_steps": 4, "outer_lr": 0.7, "outer_momentum": 0.5,
                  "robust": {"kind": robust}},
        train={"steps": 16, "lr": 1e-2, "warmup_steps": 1, "eval_batches": 2, "eval_every_steps": 1000},
        cluster={"workers": 4, "fold_order": "worker"},
    )
    faults = [Faults(), Faults(), Faults(), Faults(garbage_scale=100.0 if garbage else 0.0)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _, results = run_inproc(cfg, faults=faults)
    finally:
        torch.set_num_threads(threads)
    losses = [r.final_eval_loss for r in results if r.final_eval_loss is not None]
    return sum(losses) / len(losses)


@pytest.mark.parametrize("robust", ["trimmed_mean", "median_norm_clip"])
def test_a_worker_sending_scaled_garbage_is_neutralised_while_plain_averaging_is_wrecked(robust: str) -> None:
    clean = _final_loss("none", garbage=False)
    plain = _final_loss("none", garbage=True)
    defended = _final_loss(robust, garbage=True)
    assert not math.isfinite(plain) or plain > 1.5 * clean, (clean, plain)
    assert abs(defended - clean) <= 0.05 * clean, (clean, defended)
