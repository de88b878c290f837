"""Contraction bounds ||C(x) - x||^2 <= (1 - delta) ||x||^2, the property error feedback relies on.

top-k per chunk: delta = k / chunk length, for every chunk (Stich et al. 2018);
global top-k: delta = k / n; scaled sign: delta = ||x||_1^2 / (n ||x||_2^2) per scaling unit, with
equality (Karimireddy et al. 2019).
"""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from compression import registry

# Adversarial-ish inputs: arbitrary finite floats (ties, zeros, huge and tiny magnitudes) as float64.
VALUES = st.lists(
    st.one_of(st.floats(-1e6, 1e6, allow_nan=False), st.sampled_from([0.0, 1.0, -1.0])), min_size=1, max_size=90
)
REL = 1e-9  # float64 rounding slack


def sq(t: torch.Tensor) -> float:
    return float((t.double() ** 2).sum())


@settings(max_examples=50, deadline=None)
@given(values=VALUES, chunk=st.sampled_from([1, 3, 8, 16, 4096]), density=st.sampled_from([0.05, 0.2, 0.5]))
def test_chunked_topk_contracts_every_chunk(values: list[float], chunk: int, density: float) -> None:
    x = torch.tensor(values, dtype=torch.float64)
    payload = registry.build("topk", density=density, chunk=chunk).compress(x)
    y = registry.decode(payload)
    for start in range(0, x.numel(), chunk):
        xc, yc = x[start : start + chunk], y[start : start + chunk]
        k = min(xc.numel(), max(1, round(density * xc.numel())))
        delta = k / xc.numel()
        assert sq(yc - xc) <= (1 - delta) * sq(xc) * (1 + REL)


@settings(max_examples=50, deadline=None)
@given(values=VALUES, density=st.sampled_from([0.01, 0.1, 0.3, 1.0]))
def test_global_topk_contracts_with_delta_k_over_n(values: list[float], density: float) -> None:
    x = torch.tensor(values, dtype=torch.float64)
    payload = registry.build("topk_global", density=density).compress(x)
    delta = int(payload.meta["k"]) / x.numel()
    assert sq(registry.decode(payload) - x) <= (1 - delta) * sq(x) * (1 + REL)


@settings(max_examples=50, deadline=None)
@given(values=VALUES, chunk=st.sampled_from([None, 1, 4, 16]))
def test_scaled_sign_error_is_exactly_one_minus_delta_per_unit(values: list[float], chunk: int | None) -> None:
    x = torch.tensor(values, dtype=torch.float32)
    y = registry.decode(registry.build("sign", chunk=chunk).compress(x)).double()
    x64 = x.double()
    unit = chunk or x.numel()
    for start in range(0, x.numel(), unit):
        xc, yc = x64[start : start + unit], y[start : start + unit]
        if sq(xc) == 0:
            assert sq(yc) == 0
            continue
        delta = float(xc.abs().sum()) ** 2 / (xc.numel() * sq(xc))
        # The float32 scale costs a little; the identity holds to float32 precision, relative to ||x||^2 (when
        # delta is within float32 rounding of 1, 1 - delta itself is below that precision).
        assert abs(sq(yc - xc) - (1 - delta) * sq(xc)) <= 1e-5 * sq(xc)


def test_randomk_contracts_in_expectation() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, generator=gen, dtype=torch.float64) ** 3  # heavy-ish tails
    compressor = registry.build("randomk", density=0.1)
    errors = [sq(registry.decode(compressor.compress(x, key="x")) - x) for _ in range(400)]
    # E||C(x) - x||^2 = (1 - k/n) ||x||^2 exactly; the mean of 400 draws is within a few percent.
    assert abs(sum(errors) / len(errors) / ((1 - 20 / 200) * sq(x)) - 1) < 0.05
