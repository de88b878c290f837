"""The `faults:` section of a run: injected slowness for experiments (worker/faults.py applies it).

`stragglers` slows chosen workers down by a factor: a worker with factor `f` sleeps `(f - 1)` times its own
measured duration after every inner step, so it runs `f` times slower than the machine lets it. Exactly one
way to choose the factors:

- `factors: [3, 1, 1, 1]`: worker `i` gets entry `i % len(factors)`;
- `fraction: 0.25, factor: 3`: `round(fraction * workers)` workers (at least one when `fraction > 0`),
  drawn once from the run seed, get `factor`, the others 1;
- `lognormal_sigma: 0.5`: worker `i` gets `exp(sigma * |z_i|)`, `z_i` the i-th standard normal draw of a
  generator seeded by the run seed (a slowdown is >= 1: nobody runs faster than its machine).

Every process resolves the same factor for the same worker (`StragglersConfig.factor_for`).
"""

from __future__ import annotations

import math
import random

from pydantic import Field, model_validator

from protocols.settings import _Strict


class StragglersConfig(_Strict):
    """Per-worker slowdown factors; see the module docstring."""

    factors: list[float] | None = Field(None, min_length=1)
    fraction: float | None = Field(None, gt=0.0, le=1.0)
    factor: float = Field(3.0, ge=1.0)
    lognormal_sigma: float | None = Field(None, gt=0.0)

    @model_validator(mode="after")
    def _one_way(self) -> StragglersConfig:
        chosen = [name for name in ("factors", "fraction", "lognormal_sigma") if getattr(self, name) is not None]
        if len(chosen) != 1:
            raise ValueError("faults.stragglers takes exactly one of factors (a list), fraction (with factor) or "
                             f"lognormal_sigma; got {chosen or 'none'}")
        if self.factors is not None and any(not (math.isfinite(f) and f >= 1.0) for f in self.factors):
            raise ValueError(f"faults.stragglers.factors must each be a finite number >= 1, got {self.factors}")
        return self

    def slowed(self, workers: int, seed: int) -> set[int]:
        """With `fraction`: the worker indices slowed down (drawn once from the run seed)."""
        if self.fraction is None:
            return set()
        count = max(1, round(self.fraction * workers))
        return set(random.Random(f"lowband.stragglers:{seed}").sample(range(workers), min(count, workers)))

    def factor_for(self, index: int, workers: int, seed: int) -> float:
        """Worker `index`'s slowdown (>= 1) in a run of `workers` workers seeded with `seed` (pure)."""
        if index < 0:
            raise ValueError(f"worker index must be >= 0, got {index}")
        if self.factors is not None:
            return float(self.factors[index % len(self.factors)])
        if self.fraction is not None:
            return self.factor if index % workers in self.slowed(workers, seed) else 1.0
        assert self.lognormal_sigma is not None  # _one_way checked it
        rng = random.Random(f"lowband.stragglers.lognormal:{seed}")
        z = [rng.normalvariate(0.0, 1.0) for _ in range(index + 1)][-1]
        return math.exp(self.lognormal_sigma * abs(z))


class FaultsConfig(_Strict):
    """Injected faults that the whole run agrees on (a worker's own `--step-delay` etc. stay CLI flags)."""

    stragglers: StragglersConfig | None = None

    def slowdown(self, index: int, workers: int, seed: int) -> float:
        """Worker `index`'s slowdown factor: 1.0 without `stragglers`."""
        return 1.0 if self.stragglers is None else self.stragglers.factor_for(index, workers, seed)
