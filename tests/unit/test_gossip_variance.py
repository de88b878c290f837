"""Variance-corrected averaging (Tian et al., arXiv:2404.04616): averaging m independent Xavier-initialized
models divides each layer's variance by m; the correction restores it, and leaves norms and biases alone."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from protocols.gossip import (
    DEFAULT_EXCLUDE,
    corrected_gossip_average,
    corrected_mix,
    gossip_average,
    incoming_weights,
    layer_variance,
    mixing_matrix,
    variance_correct,
)
from protocols.gossip.variance import is_excluded
from protocols.replica import Params
from protocols.settings import ModelConfig
from worker.model import GPT


def _xavier_linears(m: int) -> list[Params]:
    torch.manual_seed(m)
    models = []
    for _ in range(m):
        layer = nn.Linear(256, 256)
        nn.init.xavier_uniform_(layer.weight)
        models.append({name: p.detach().clone() for name, p in layer.named_parameters()})
    return models


@pytest.mark.parametrize("m", [4, 8, 16])
def test_averaging_m_xavier_models_divides_the_variance_by_m_and_the_correction_restores_it(m: int) -> None:
    models = _xavier_linears(m)
    w = mixing_matrix("full", m)  # every node averages all m models with weight 1/m
    plain = gossip_average(models, w)[0]
    corrected = corrected_gossip_average(models, w)[0]
    mean_var = sum(layer_variance(x["weight"]) for x in models) / m
    assert mean_var == pytest.approx(2 / (256 + 256), rel=0.02)  # Xavier: Var = 2 / (fan_in + fan_out)
    assert layer_variance(plain["weight"]) * m == pytest.approx(mean_var, rel=0.2)
    assert layer_variance(corrected["weight"]) == pytest.approx(mean_var, rel=0.05)
    # Rescaled around its mean: the mean and the direction of every entry's deviation are kept.
    assert float(corrected["weight"].mean()) == pytest.approx(float(plain["weight"].mean()), abs=1e-7)
    assert torch.equal(torch.sign(corrected["weight"] - corrected["weight"].mean()),
                       torch.sign(plain["weight"] - plain["weight"].mean()))
    assert torch.equal(corrected["bias"], plain["bias"])  # excluded: plain-averaged


def test_repeated_ring_gossip_makes_the_variance_vanish_unless_corrected() -> None:
    models = _xavier_linears(8)
    mean_var = sum(layer_variance(x["weight"]) for x in models) / 8
    w = mixing_matrix("ring", 8)
    plain, corrected = models, models
    for _ in range(5):
        plain = gossip_average(plain, w)
        corrected = corrected_gossip_average(corrected, w)
    assert max(layer_variance(x["weight"]) for x in plain) < 0.5 * mean_var
    for x in corrected:
        assert layer_variance(x["weight"]) == pytest.approx(mean_var, rel=0.05)


def test_correction_is_the_identity_at_consensus() -> None:
    model = _xavier_linears(1)[0]
    out = corrected_gossip_average([model] * 4, mixing_matrix("ring", 4))
    for node in out:
        torch.testing.assert_close(node["weight"], model["weight"])


def test_self_weighted_targets_the_mixing_weighted_variance() -> None:
    g = torch.Generator().manual_seed(0)
    a = {"w": torch.randn(4000, generator=g, dtype=torch.float64)}  # variance ~1
    b = {"w": 2 * torch.randn(4000, generator=g, dtype=torch.float64)}  # variance ~4
    va, vb = layer_variance(a["w"]), layer_variance(b["w"])
    uniform = corrected_mix(a, {1: b}, {1: 0.25}, 0.75)
    weighted = corrected_mix(a, {1: b}, {1: 0.25}, 0.75, self_weighted=True)
    assert layer_variance(uniform["w"]) == pytest.approx((va + vb) / 2, rel=1e-9)
    assert layer_variance(weighted["w"]) == pytest.approx(0.75 * va + 0.25 * vb, rel=1e-9)
    explicit = variance_correct({"w": 0.75 * a["w"] + 0.25 * b["w"]}, [a, b], [3.0, 1.0])  # normalized weights
    torch.testing.assert_close(explicit["w"], weighted["w"])


@pytest.mark.parametrize("self_weighted", [False, True])
def test_per_node_corrected_mix_is_the_network_step(self_weighted: bool) -> None:
    models = _xavier_linears(6)
    w = mixing_matrix("ring", 6)
    network = corrected_gossip_average(models, w, self_weighted=self_weighted)
    for i in range(6):
        self_weight, weights = incoming_weights(w, i)
        got = corrected_mix(models[i], {j: models[j] for j in weights}, weights, self_weight,
                            self_weighted=self_weighted)
        for name in got:
            torch.testing.assert_close(got[name], network[i][name])


def test_default_exclusions_are_exactly_our_gpts_norms() -> None:
    names = [name for name, _ in GPT(ModelConfig(n_layer=2), vocab_size=11).named_parameters()]
    excluded = sorted(n for n in names if is_excluded(n, DEFAULT_EXCLUDE))
    assert excluded == sorted(n for n in names if ".ln_" in n or n.startswith("ln_"))
    assert len(excluded) == 10  # ln_1, ln_2 per block (weight, bias) and ln_f
    assert not is_excluded("blocks.0.attn.qkv.weight", DEFAULT_EXCLUDE)
    assert is_excluded("model.layers.0.input_layernorm.weight", DEFAULT_EXCLUDE)
    assert is_excluded("fc.bias", DEFAULT_EXCLUDE)


def test_custom_exclusions_are_plain_averaged() -> None:
    models = _xavier_linears(4)
    w = mixing_matrix("full", 4)
    out = corrected_gossip_average(models, w, exclude=("weight",))[0]
    plain = gossip_average(models, w)[0]
    assert torch.equal(out["weight"], plain["weight"])
    assert layer_variance(out["bias"]) > 2 * layer_variance(plain["bias"])  # the bias is corrected now
