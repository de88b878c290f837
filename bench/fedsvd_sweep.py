"""The client-lr sweep behind bench.fedsvd's HP (its module docstring, item 4): `python -m bench.fedsvd --sweep`.

Each protocol at each lr under DP at seed SWEEP_SEED (no reported seed), everything else as the bench's runs;
the lr a protocol's HP uses is the one with its lowest final eval loss (`best_lrs`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from bench.fedsvd import METHODS, SWEEP_SEED, Hyper, Plan, finetune_config, pretrain, simulate


def sweep_run(kind: str, lr: float, hp: Hyper, plan: Plan, base: str) -> dict[str, Any]:
    """One sweep run: `kind` at client lr `lr` from the checkpoint `base`; its curve cut to the eval losses."""
    torch.set_num_threads(1)  # the simulator's pool workers are threads
    cfg = finetune_config(kind, SWEEP_SEED, Hyper(**{**asdict(hp), "lr": lr, "lrs": {}}), base, True,
                          plan.max_chars, plan.clients, plan.script_eval_every)
    run = simulate(cfg)
    run["curve"] = [round(p["eval_loss"], 4) for p in run["curve"]]
    return {"method": kind, "lr": lr, **run}


def _runs(runs: list[tuple[str, float]], plan: Plan, base: str, jobs: int) -> Iterator[dict[str, Any]]:
    """`sweep_run` of every (method, lr) of `runs`, in that order; `jobs` > 1 runs that many processes at once
    (each run seeds everything from its arguments, so the results do not depend on `jobs`)."""
    if jobs <= 1:
        yield from (sweep_run(kind, lr, plan.hp, plan, base) for kind, lr in runs)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        n = len(runs)
        yield from pool.map(sweep_run, *zip(*runs, strict=True), [plan.hp] * n, [plan] * n, [base] * n)


def grid(lrs: list[float], methods: tuple[str, ...] = METHODS, relative_to: Hyper | None = None,
         ) -> list[tuple[str, float]]:
    """Every (method, lr) to run: each of `methods` at every lr of `lrs`, or, `relative_to` some Hyper, at every
    multiple `lrs` of its lr there (one grid spans protocols whose lrs differ: FedSVD's steps are longer at one
    lr)."""
    return [(kind, float(f"{lr * relative_to.lr_for(kind) if relative_to else lr:.6g}"))
            for kind in methods for lr in lrs]


def sweep(plan: Plan, runs: list[tuple[str, float]], out: Path, base: Path | None,
          log: Callable[[str], None] = print, jobs: int = 1) -> dict[str, Any]:
    """Every (method, lr) of `runs` (`grid`), the other hyperparameters (rank included) `plan.hp`'s.
    Fine-tunes from `base` (a checkpoint or run directory) or from a base pretrained here into <out stem>-base/.
    Writes `out` (JSON) after every run; an existing `out` of the same seed and hp is extended, so a sweep can
    be run one protocol at a time. Returns the document written."""
    torch.set_num_threads(1)
    if base is None:
        made = pretrain(plan.pretrain_steps, plan.max_chars, out.with_name(out.stem + "-base"))
        base = Path(made["checkpoint"])
    hp = {k: v for k, v in asdict(plan.hp).items() if k not in ("lr", "lrs")}
    doc: dict[str, Any] = {"seed": SWEEP_SEED, "hp": hp, "base": str(base), "runs": [],
                           "scored_by": "per protocol, the lowest final eval loss (DP)"}
    if out.exists():
        old = json.loads(out.read_text())
        if old.get("seed") == doc["seed"] and old.get("hp") == doc["hp"]:
            doc["runs"] = old["runs"]
    for run in _runs(runs, plan, str(base), jobs):
        doc["runs"] = [r for r in doc["runs"] if (r["method"], r["lr"]) != (run["method"], run["lr"])]
        doc["runs"].append(run)
        log(f"sweep {run['method']} rank {plan.hp.rank} lr {run['lr']:g}: eval {run['base_eval_loss']:.4f} -> "
            f"{run['final_eval_loss']:.4f}, {run['wall_s']:.1f} s")
        doc["best_lr"] = best_lrs(doc["runs"])
        out.write_text(json.dumps(doc, indent=2) + "\n")
    return doc


def best_lrs(runs: list[dict[str, Any]]) -> dict[str, float]:
    """Per protocol among `runs` (method, lr, final_eval_loss): the lr of its lowest final eval loss."""
    best: dict[str, dict[str, Any]] = {}
    for r in runs:
        if r["method"] not in best or r["final_eval_loss"] < best[r["method"]]["final_eval_loss"]:
            best[r["method"]] = r
    return {kind: float(r["lr"]) for kind, r in sorted(best.items())}
