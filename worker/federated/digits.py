"""The classic federated task: scikit-learn's bundled `digits` (8x8 handwritten digits, 1,797 samples, 10 classes).

The data ships inside scikit-learn (the file behind `sklearn.datasets.load_digits`), so it loads offline; it
is read without importing sklearn. Pixels (0..16) are scaled to [0, 1] float32; labels are int64. A fixed,
stratified `eval_fraction` (20%) is held out for the server's evaluation (per class, a seeded random share),
so every class is in eval in proportion; the rest is what the clients partition (worker/federated/partition.py).

`DigitsMLP` is 64-64-10 with a ReLU: 4,810 parameters. Its `forward(x, targets=None) -> (logits, loss | None)`
matches `worker.model.GPT.forward`, so lowband's trainer and federated clients drive either the same way.
Weights start from torch's global RNG: `torch.manual_seed(s)` then `DigitsMLP()` gives identical models.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

N_FEATURES = 64
N_CLASSES = 10


class DigitsSplit(NamedTuple):
    """Train and server-side eval arrays: X (N, 64) float32 in [0, 1], y (N,) int64."""

    train_x: np.ndarray
    train_y: np.ndarray
    eval_x: np.ndarray
    eval_y: np.ndarray


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    """sklearn's bundled digits (`datasets/data/digits.csv.gz`: 64 pixel counts 0-16 and the label per row),
    read from the installed package without importing sklearn, whose import alone takes 1.6 s here: a
    simulation's first round should not wait for it."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the digits task needs scikit-learn installed (it ships the data)")
    path = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / "digits.csv.gz"
    rows = np.loadtxt(path, delimiter=",", dtype=np.float32)  # (1797, 65)
    return (rows[:, :-1] / 16.0).astype(np.float32), rows[:, -1].astype(np.int64)


def load_digits_split(eval_fraction: float = 0.2, seed: int = 0) -> DigitsSplit:
    """The digits data with a stratified `eval_fraction` held out (fixed by `seed`): from each class, a seeded
    random `round(eval_fraction * count)` of its samples."""
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must lie in (0, 1), got {eval_fraction}")
    x, y = _digits()  # (1797, 64), (1797,)
    rng = np.random.default_rng(seed)
    held = np.zeros(len(y), dtype=bool)
    for label in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == label))
        held[members[: round(eval_fraction * len(members))]] = True
    train, held_out = rng.permutation(np.flatnonzero(~held)), rng.permutation(np.flatnonzero(held))
    return DigitsSplit(x[train], y[train], x[held_out], y[held_out])


class DigitsMLP(nn.Module):
    """64 -> 64 (ReLU) -> 10 logits."""

    def __init__(self, hidden: int = 64) -> None:
        super().__init__()
        self.fc = nn.Linear(N_FEATURES, hidden)
        self.head = nn.Linear(hidden, N_CLASSES)

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, 10) for features `x` (B, 64); mean cross-entropy against `targets` (B,) if given."""
        if x.dim() != 2 or x.size(1) != N_FEATURES:
            raise ValueError(f"x must be (batch, {N_FEATURES}), got shape {tuple(x.shape)}")
        logits = self.head(F.relu(self.fc(x)))  # (B, 64) -> (B, H) -> (B, 10)
        if targets is None:
            return logits, None
        return logits, F.cross_entropy(logits, targets)


@torch.no_grad()
def accuracy(model: nn.Module, x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor) -> float:
    """Fraction of `x` whose arg-max logit is its label `y` (model put in eval mode for the pass)."""
    was_training = model.training
    model.eval()
    try:
        logits, _ = model(torch.as_tensor(x, dtype=torch.float32))
    finally:
        model.train(was_training)
    return float((logits.argmax(dim=1) == torch.as_tensor(y)).float().mean())
