"""Differential privacy for federated clients: the `dp:` section (pure pydantic; the mechanism is
worker/federated/dp.py, through `opacus`).

Each client trains with DP-SGD (Abadi et al. 2016, arXiv:1607.00133): every example's gradient is clipped to
L2 norm `max_grad_norm`, the clipped gradients of a batch are summed, Gaussian noise of standard deviation
`noise_multiplier * max_grad_norm` is added, and the sum is divided by the batch size. The guarantee is
example-level (epsilon, delta)-DP of each client's own data against everything the client sends.

Budget rule. The noise multiplier is fixed before the run starts, for the worst case: a client that takes part
in every one of the planned rounds, taking `steps_per_round` local steps each time at the largest sampling
rate any client has (`batch_size / examples` of the smallest client; a larger rate spends more). With
`noise_multiplier` unset it is derived (Opacus's `get_noise_multiplier`, with the chosen accountant) so that
this worst case spends at most `epsilon`; with `noise_multiplier` set, the worst case's epsilon is computed
and must not exceed `epsilon`. Either way a run whose budget cannot be met (a derived multiplier above
`max_noise_multiplier`, or an explicit multiplier too small) is refused with a `ConfigError` before anything
trains; client sampling only ever spends less, so the budget holds whatever clients are drawn. The epsilon
actually spent is tracked per client (an accountant's history of (noise, sampling rate, steps)) and reported
per round and in summary.json.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, PositiveFloat

from protocols.settings import ConfigError, _Strict

__all__ = ["ConfigError", "DPConfig"]


class DPConfig(_Strict):
    """DP-SGD on every client; see the module docstring for the budget rule.

    - `enabled`: train clients with DP-SGD (off: plain local steps, no accounting).
    - `epsilon`, `delta`: the target (epsilon, delta) every client's data gets over the whole run; delta should
      be well below 1 / (examples per client).
    - `max_grad_norm`: the per-example clipping norm C (L2, over all trainable parameters together).
    - `noise_multiplier`: sigma, the noise's standard deviation in units of C; None (default) derives it from
      `epsilon`, `delta` and the planned rounds; a value given is checked against the target instead.
    - `max_noise_multiplier`: the largest derived sigma accepted; a target that needs more is refused, since
      the updates would be mostly noise.
    - `accountant`: Opacus's privacy accountant: `rdp` (Renyi DP, Mironov 2017; the conservative default) or
      `prv` (privacy random variables, Gopi et al. 2021; tighter).
    """

    enabled: bool = False
    epsilon: PositiveFloat = 6.0
    delta: float = Field(1e-5, gt=0.0, lt=1.0)
    max_grad_norm: PositiveFloat = 1.0
    noise_multiplier: PositiveFloat | None = None
    max_noise_multiplier: PositiveFloat = 20.0
    accountant: Literal["rdp", "prv"] = "rdp"
