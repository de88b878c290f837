"""bench/paired.py: the paired comparison of two methods over the same seeds."""

from __future__ import annotations

import math

import pytest

from bench import paired


def test_sign_test_is_the_exact_binomial_tail() -> None:
    assert paired.sign_test_p(8, 8) == pytest.approx(2 / 256)
    assert paired.sign_test_p(0, 8) == pytest.approx(2 / 256)
    assert paired.sign_test_p(6, 8) == pytest.approx(2 * (1 + 8 + 28) / 256)
    assert paired.sign_test_p(4, 8) == 1.0


def test_one_seed_gives_no_t_test_and_is_never_ahead() -> None:
    out = paired.compare([1.5], [1.4])
    assert out["differences"] == pytest.approx([0.1]) and out["wins"] == 1
    assert math.isnan(out["t"]) and math.isnan(out["p"]) and not paired.ahead(out)


def test_the_two_sides_must_cover_the_same_seeds() -> None:
    with pytest.raises(ValueError, match="same seeds on both sides, got 2 and 1"):
        paired.compare([1.5, 1.6], [1.4])
