"""Variance-corrected model averaging (Tian, Al-Ars, Kitsak, Hofstee, "Vanishing Variance Problem in Fully
Decentralized Neural-Network Systems", arXiv:2404.04616).

Averaging m uncorrelated models (early in gossip learning, or any time neighbours have drifted apart)
divides each layer's weight variance by about m: for independent zero-mean entries,
Var(mean_k w_k) = Var(w) / m. That undoes the variance Xavier/He initialization chose for signal
propagation and stalls training (the paper's "plateau delay"). The fix: after averaging, rescale each
layer's averaged tensor around its own mean so its variance is the mean variance of the models that went
into it,

    a' = mean(a) + (a - mean(a)) * sqrt(target / Var(a)),   target = sum_k c_k Var(w_k)

with c_k = 1/m over the contributing models (the paper), or, `self_weighted`, the mixing weights
themselves (own model included), so the target is the same convex combination as the average. When the
models agree (consensus), Var(a) = target and the correction is the identity. Variances are population
variances over all entries of the tensor, in float64. Tensors matching an `exclude` pattern (norm gains
and biases: constant-initialized, not variance-scaled; averaging does not shrink them) are plain-averaged,
as are tensors of fewer than 2 entries and exactly constant averages (no spread to rescale).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from fnmatch import fnmatchcase

import torch

from protocols.gossip.average import check_models, gossip_average, mix, work_dtype
from protocols.replica import Params

# Our GPT (worker/model.py) names its norms blocks.<i>.ln_1 / ln_2 and ln_f; HF models use ln_* (GPT-2) or
# *norm* (Llama's input_layernorm, a final `norm`); every bias is a component named `bias`.
DEFAULT_EXCLUDE: tuple[str, ...] = ("bias", "*norm*", "ln_*", "ln")


def is_excluded(name: str, exclude: Sequence[str]) -> bool:
    """Whether an fnmatch pattern matches the whole dotted name or one of its components: "bias" catches
    "fc.bias" and a bare "bias", "blocks.*.attn.*" whole names."""
    parts = name.split(".")
    return any(fnmatchcase(name, p) or any(fnmatchcase(part, p) for part in parts) for p in exclude)


def layer_variance(t: torch.Tensor) -> float:
    """Population variance of all entries of t (float64); 0 for fewer than 2 entries."""
    if t.numel() < 2:
        return 0.0
    return float(t.detach().to(torch.float64).var(correction=0))


def rescale_variance(t: torch.Tensor, target: float) -> torch.Tensor:
    """t rescaled around its mean to variance `target` (t itself when it has no spread)."""
    current = layer_variance(t)
    if current <= 0.0 or target < 0.0:
        return t
    dtype = work_dtype(t)
    x = t.detach().to(dtype)
    mean = x.mean()
    return ((x - mean) * (target / current) ** 0.5 + mean).to(t.dtype)


def _correctable(name: str, t: torch.Tensor, exclude: Sequence[str]) -> bool:
    return t.dtype.is_floating_point and t.numel() >= 2 and not is_excluded(name, exclude)


def variance_correct(
    averaged: Params,
    contributors: Sequence[Params],
    weights: Sequence[float] | None = None,
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
) -> Params:
    """Rescale each non-excluded tensor of `averaged` to sum_k c_k Var(contributors[k][name]).

    contributors: the models that were averaged into `averaged` (same names and shapes).
    weights: c_k, one per contributor (normalized here); None = uniform 1/m, the paper's rule.
    """
    check_models([averaged, *contributors])
    if weights is None:
        coefficients = [1.0 / len(contributors)] * len(contributors)
    else:
        if len(weights) != len(contributors) or any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"need one non-negative weight per contributor ({len(contributors)}), got {list(weights)}")
        coefficients = [w / sum(weights) for w in weights]
    out: Params = {}
    for name, avg in averaged.items():
        if not _correctable(name, avg, exclude):
            out[name] = avg
            continue
        target = sum(c * layer_variance(m[name]) for c, m in zip(coefficients, contributors, strict=True))
        out[name] = rescale_variance(avg, target)
    return out


def corrected_mix(
    own: Params,
    received: Mapping[int, Params],
    weights: Mapping[int, float],
    self_weight: float,
    *,
    self_weighted: bool = False,
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
) -> Params:
    """Node i's gossip step (`average.mix`) followed by the variance correction over own + received."""
    senders = sorted(received)
    averaged = mix(own, received, weights, self_weight)
    contributors = [own, *(received[j] for j in senders)]
    coefficients = [self_weight, *(weights[j] for j in senders)] if self_weighted else None
    return variance_correct(averaged, contributors, coefficients, exclude)


def corrected_gossip_average(
    models: Sequence[Params],
    w: torch.Tensor,
    *,
    self_weighted: bool = False,
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
) -> list[Params]:
    """`gossip_average` for all n nodes, each node's result corrected over its contributors
    (the j with W[i, j] > 0)."""
    check_models(models)
    averaged = gossip_average(models, w)
    # Each model's per-layer variance once, not once per receiving node.
    variances = [
        {name: layer_variance(t) for name, t in m.items() if _correctable(name, t, exclude)} for m in models
    ]
    out: list[Params] = []
    for i, avg in enumerate(averaged):
        row = w[i].tolist()
        contributors = [j for j, c in enumerate(row) if c > 0]
        total = sum(row[j] for j in contributors)
        coefficients = {j: (row[j] / total if self_weighted else 1.0 / len(contributors)) for j in contributors}
        corrected: Params = {}
        for name, t in avg.items():
            if name in variances[0]:
                t = rescale_variance(t, sum(c * variances[j][name] for j, c in coefficients.items()))
            corrected[name] = t
        out.append(corrected)
    return out
