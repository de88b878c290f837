"""Clients of the "A frozen" federated protocols (FFA-LoRA, FedSVD) train B only: the protocol's
`frozen_in_training` reaches the inner optimizer through `Session.build`; and both protocols run whole rounds
in process with a LoRA GPT (A fixed under FFA-LoRA, re-factorized to orthonormal rows under FedSVD)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from coordinator.rundir import load_checkpoint
from deploy.inproc import run_inproc
from tests.conftest import tiny_config
from worker.optimizers import build_optimizer
from worker.session import Session

LORA = {"method": "lora", "rank": 4, "alpha": 8}
ROUNDS, H = 3, 3


def lora_session(kind: str) -> Session:
    return Session.build(tiny_config(lowrank=LORA, protocol={"kind": kind, "inner_steps": H}), 0, 2)


def factors(session: Session, which: str) -> dict[str, torch.Tensor]:
    return {n: t for n, t in session.params().items() if f".lora_{which}." in n}


@pytest.mark.parametrize(("kind", "a_trains"), [("fedsvd", False), ("ffa-lora", False), ("fedavg-lora", True)])
def test_the_inner_optimizer_skips_the_frozen_a_factors(kind: str, a_trains: bool) -> None:
    session = lora_session(kind)
    a0, b0 = factors(session, "A"), factors(session, "B")
    assert a0 and b0 and set(session.params()) == set(a0) | set(b0)  # A stays exchanged either way
    named = dict(session.model.named_parameters())
    optimized = {id(p) for group in session.trainer.optimizer.param_groups for p in group["params"]}
    assert optimized == {id(named[n]) for n in (*b0, *(a0 if a_trains else ()))}
    session.trainer.train(3)  # B starts at zero: A's gradient is nonzero from the second step on
    a1, b1 = factors(session, "A"), factors(session, "B")
    assert all(not torch.equal(b1[n], b0[n]) for n in b0)
    assert all(torch.equal(a1[n], a0[n]) != a_trains for n in a0)
    if not a_trains:
        assert all(named[n].grad is None for n in a0)  # dropped before clipping: the clip norm is B's


def test_build_optimizer_refuses_to_freeze_everything() -> None:
    session = lora_session("fedsvd")
    cfg = session.cfg
    with pytest.raises(ValueError, match=r"every trainable parameter matches the frozen names \['lora_'\]"):
        build_optimizer(session.model, cfg.train, cfg.lowrank, 1e-3, frozen=("lora_",))


def run(kind: str, tmp: Path) -> tuple[dict[str, Any], list[Any], dict[str, torch.Tensor]]:
    cfg = tiny_config(
        run_dir=str(tmp), lowrank=LORA, protocol={"kind": kind, "inner_steps": H},
        train={"steps": ROUNDS * H, "lr": 1e-2, "warmup_steps": 1, "eval_batches": 2, "eval_every_steps": ROUNDS * H},
        cluster={"workers": 2, "transport": "inproc"},
    )
    summary, results = run_inproc(cfg, tmp)
    assert summary["rounds"] == ROUNDS and len({r.state_hashes[-1] for r in results}) == 1
    for r in results:
        assert r.final_eval_loss is not None and r.final_eval_loss < r.evals[0]["eval_loss"], r.evals
    params: dict[str, torch.Tensor] = load_checkpoint(tmp / "checkpoint.pt")["params"]
    return summary, results, params


def test_ffa_lora_runs_rounds_with_a_fixed_at_its_initialization(tmp_path: Path) -> None:
    _, _, params = run("ffa-lora", tmp_path)
    initial = lora_session("ffa-lora").params()  # the same seed: the same initial A on every worker
    a_names = [n for n in params if ".lora_A." in n]
    assert a_names and all(torch.equal(params[n], initial[n]) for n in a_names)
    assert all(bool(params[n].any()) for n in params if ".lora_B." in n)  # B left zero: it trained


def test_fedsvd_runs_rounds_with_orthonormal_a(tmp_path: Path) -> None:
    _, _, params = run("fedsvd", tmp_path)
    initial = lora_session("fedsvd").params()
    for name in (n for n in params if ".lora_A." in n):
        a = params[name]
        assert float((a @ a.T - torch.eye(a.shape[0])).abs().max()) < 1e-5, name
        assert not torch.equal(a, initial[name])  # re-factorized every round
