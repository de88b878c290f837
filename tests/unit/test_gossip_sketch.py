"""The consensus sketch: a Johnson-Lindenstrauss projection every process draws alike, whose consensus
distance tracks the models' own."""

from __future__ import annotations

import math

import pytest
import torch

from protocols.gossip import consensus_distance
from protocols.gossip.sketch import CHUNK, consensus_distance_from_sketches, sketch
from protocols.replica import Params


def _models(n: int, seed: int, spread: float = 1.0) -> list[Params]:
    """n models around a shared centre; a tensor larger than a chunk so the chunked projection is exercised."""
    g = torch.Generator().manual_seed(seed)
    centre = {"emb.weight": torch.randn(CHUNK + 1000, generator=g), "fc.weight": torch.randn(40, 30, generator=g)}
    return [{k: v + spread * torch.randn(v.shape, generator=g) for k, v in centre.items()}
            | {"step": torch.tensor(k)} for k in range(n)]


@pytest.mark.parametrize("seed", range(5))
def test_the_sketch_distance_is_within_a_quarter_of_the_true_consensus_distance(seed: int) -> None:
    models = _models(6, seed, spread=0.1 * (seed + 1))
    truth = consensus_distance(models) / math.sqrt(len(models))  # sqrt((1/n) sum_i ||x_i - x_bar||^2)
    estimate = consensus_distance_from_sketches([sketch(m, seed=seed) for m in models])
    assert abs(estimate - truth) <= 0.25 * truth, (estimate, truth)


def test_identical_models_have_distance_exactly_zero_and_the_sketch_is_reproducible() -> None:
    model = _models(1, 3)[0]
    copies = [{k: v.clone() for k, v in model.items()} for _ in range(4)]
    sketches = [sketch(m) for m in copies]
    assert consensus_distance_from_sketches(sketches) == 0.0
    assert sketches[0] == sketch(model) and len(sketches[0]) == 64
    # Another seed is another projection; another model another sketch.
    assert sketch(model, seed=1) != sketches[0] and sketch(_models(1, 4)[0]) != sketches[0]


def test_the_sketch_preserves_norms_in_expectation_and_ignores_non_floating_tensors() -> None:
    g = torch.Generator().manual_seed(0)
    x = {"w": torch.randn(5000, generator=g)}
    ratios = [sum(v * v for v in sketch(x, seed=s)) / float((x["w"] ** 2).sum()) for s in range(40)]
    assert sum(ratios) / len(ratios) == pytest.approx(1.0, abs=0.1)
    assert sketch({**x, "count": torch.tensor([7, 8])}) == sketch(x)


def test_sketches_of_different_lengths_are_refused() -> None:
    with pytest.raises(ValueError, match="differ in length"):
        consensus_distance_from_sketches([[0.0, 1.0], [0.0]])
    with pytest.raises(ValueError, match="at least one"):
        consensus_distance_from_sketches([])
