"""The EControl paper's heterogeneous claim (Gao, Islamov, Stich, ICLR 2024, arXiv:2311.05645).

Ten workers, each with its own least-squares problem f_i(x) = ||A_i x - b_i||^2 / (2m) whose optima
differ, run gradient descent on the average of their compressed gradients (top-10% of each worker's
vector). At the optimum the local gradients do not vanish, so:
- without error feedback the biased compressor stalls far from the optimum;
- EF21 and EControl (eta of the order of the compressor's delta = 0.1) converge linearly to machine
  precision;
- EControl with eta far above that (here 5) feeds back more error than the compressor can carry and
  diverges.
"""

from __future__ import annotations

import pytest
import torch

from compression import registry
from compression.error_feedback import ErrorFeedback, Mirror

WORKERS, DIM, ROWS, STEPS = 10, 30, 40, 300


class Problem:
    def __init__(self, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.a = torch.randn(WORKERS, ROWS, DIM, generator=gen, dtype=torch.float64)
        # A per-worker offset makes the local optima far apart (strong heterogeneity).
        self.b = torch.randn(WORKERS, ROWS, generator=gen, dtype=torch.float64)
        self.b += 3 * torch.randn(WORKERS, 1, generator=gen, dtype=torch.float64)
        hessian = torch.einsum("wri,wrj->ij", self.a, self.a) / (WORKERS * ROWS)
        self.x_star = torch.linalg.solve(hessian, torch.einsum("wri,wr->i", self.a, self.b) / (WORKERS * ROWS))
        # Step size 1/(2 L_max) from the largest local smoothness constant.
        local_l = torch.linalg.eigvalsh(torch.einsum("wri,wrj->wij", self.a, self.a) / ROWS).amax()
        self.step_size = 0.5 / float(local_l)

    def loss(self, x: torch.Tensor) -> float:
        return float(((torch.einsum("wri,i->wr", self.a, x) - self.b) ** 2).sum()) / (2 * WORKERS * ROWS)

    def grad(self, worker: int, x: torch.Tensor) -> torch.Tensor:
        return self.a[worker].T @ (self.a[worker] @ x - self.b[worker]) / ROWS


def suboptimality(kind: str, eta: float) -> float:
    """Relative suboptimality (f(x_T) - f*) / (f(x_0) - f*) after STEPS rounds (inf if it blew up)."""
    problem = Problem()
    compressor = registry.build("topk_global", density=0.1)  # k = 3 of 30: delta = 0.1
    workers = [ErrorFeedback(compressor, kind, eta=eta) for _ in range(WORKERS)]
    mirror = Mirror(kind)
    x = torch.zeros(DIM, dtype=torch.float64)
    f_star, f_0 = problem.loss(problem.x_star), problem.loss(x)
    for _ in range(STEPS):
        messages = [registry.decode(w.step("x", problem.grad(i, x))) for i, w in enumerate(workers)]
        x = x - problem.step_size * mirror.update("x", torch.stack(messages).mean(dim=0))
        if not bool(torch.isfinite(x).all()):
            return float("inf")
    return (problem.loss(x) - f_star) / (f_0 - f_star)


def test_without_error_feedback_top_k_stalls_far_from_the_optimum() -> None:
    assert suboptimality("none", 1.0) > 1e-3


@pytest.mark.parametrize(("kind", "eta"), [("ef21", 1.0), ("econtrol", 0.1)])
def test_ef21_and_econtrol_converge_to_machine_precision(kind: str, eta: float) -> None:
    assert abs(suboptimality(kind, eta)) < 1e-10


def test_econtrol_with_a_too_large_eta_diverges() -> None:
    result = suboptimality("econtrol", 5.0)
    assert result == float("inf") or result > 1e3
