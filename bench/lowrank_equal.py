"""PiSSA against LoRA at identical hyperparameters: the PiSSA paper's own comparison, over seeds.

    python -m bench.lowrank_equal [--base CHECKPOINT] [--lrs 0.001,0.0003,0.003] [--seeds 0,1,2,3]
                                  [--out lowrank_equal]
    python -m bench.lowrank_equal --quick

Run it inside a loopback-only namespace: `deploy/loopback.sh .venv/bin/python -m bench.lowrank_equal`.

bench.lowrank gives every contender its own best lr (its sweep) and LoRA its usual alpha 16: there LoRA ends ahead
of PiSSA. The PiSSA paper (Meng, Wang and Zhang, NeurIPS 2024, arXiv:2404.02948) makes its claim, faster
convergence and a lower loss than LoRA at equal steps, under identical settings: the same rank, alpha = rank, lr,
schedule, data and steps, with the lr full fine-tuning uses (2e-5 there, for every method). This runs that
comparison on bench.lowrank's setup (bench/lowrank_runs.py: the default GPT, DiLoCo H=30, 4 all-gather ranks in
fresh processes, 300 fine-tuning steps per worker on the romances, adapters on qkv, proj and fc):

- one base, bench.lowrank's (pretrained here at `--base-seed`, or a checkpoint given by `--base`);
- `lora` and `pissa`, both rank 8 and alpha 8, for every lr of `--lrs` and every seed of `--seeds` (the
  fine-tuning's data order and LoRA's random A; the base and the eval text are the same for all);
- per lr, per seed: the final eval loss on the romances' eval text and the eval curve (every `--eval-every` steps).

The claim is judged at the first lr of `--lrs` only, by default 1e-3, full fine-tuning's tuned lr in bench.lowrank
(the paper's protocol: one lr, full fine-tuning's, for every method), fixed before any run of this bench:
`claim.holds` when PiSSA's final eval loss is below LoRA's on the mean with a paired t-test over the seeds at
p < 0.05 (`bench.paired`) and its mean curve is below LoRA's at every eval point after the start. The other lrs get
the same figures (`by_lr`) without a verdict: they say how far the result carries.

Writes bench/results/<out>.json and <out>.png (per lr, the mean eval curve of each method over the seeds).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import RESULTS, comma_list, command_line, write_result
from bench.lowrank import curve
from bench.lowrank_runs import RANK, bytes_per_worker, finetune_config, pretrain, run_contender
from bench.paired import ahead, compare

METHODS = {"lora": "lora-r8", "pissa": "pissa-r8"}  # method -> bench.lowrank contender (its adapters, at ALPHA)
ALPHA = RANK  # the paper's alpha = rank, for both
COLUMNS = ["method", "lr", "seed", "final_eval_loss", "bytes_sent_per_worker", "bytes_received_per_worker",
           "bytes_total_per_worker", "wall_s"]


@dataclass(frozen=True)
class Plan:
    pretrain_steps: int = 4000  # bench.lowrank's budget
    steps: int = 300
    eval_every: int = 30
    max_chars: int = 0
    lrs: tuple[float, ...] = (1e-3, 3e-4, 3e-3)  # the first is judged: full fine-tuning's tuned lr in bench.lowrank
    seeds: tuple[int, ...] = (0, 1, 2, 3)


QUICK = Plan(pretrain_steps=60, steps=60, max_chars=200_000, lrs=(1e-3,), seeds=(0, 1))


def mean_curve(curves: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The eval points every curve has, each the mean over the curves (seeds) of its eval loss."""
    steps = sorted(set.intersection(*({p["step"] for p in c} for c in curves))) if curves else []
    by_step = [{p["step"]: p for p in c} for c in curves]
    return [{"step": s, "tokens": by_step[0][s]["tokens"],
             "eval_loss": statistics.fmean(c[s]["eval_loss"] for c in by_step)} for s in steps]


def judge(rows: list[dict[str, Any]], lrs: list[float], seeds: list[int]) -> dict[str, Any]:
    """Per lr: each method's mean final loss and mean curve, PiSSA against LoRA paired over the seeds, and whether
    PiSSA's mean curve is below LoRA's at every eval point after the first; the claim at `lrs[0]`."""
    by = {(r["method"], r["lr"], r["seed"]): r for r in rows}
    missing = [(m, lr, s) for m in METHODS for lr in lrs for s in seeds if (m, lr, s) not in by]
    if missing:
        raise ValueError(f"no result for (method, lr, seed) {missing}: every method needs every lr and seed")
    by_lr: dict[str, Any] = {}
    for lr in lrs:
        finals = {m: [by[(m, lr, s)]["final_eval_loss"] for s in seeds] for m in METHODS}
        curves = {m: mean_curve([by[(m, lr, s)]["curve"] for s in seeds]) for m in METHODS}
        later = [(lo["eval_loss"], pi["eval_loss"]) for lo, pi in zip(curves["lora"], curves["pissa"], strict=True)
                 if lo["step"] > 0]
        paired = compare(finals["lora"], finals["pissa"])
        by_lr[f"{lr:g}"] = {
            "lr": lr, "mean_final": {m: statistics.fmean(v) for m, v in finals.items()},
            "paired": paired, "pissa_ahead": ahead(paired),
            "pissa_below_at_every_point": bool(later) and all(pi < lo for lo, pi in later),
            "points_pissa_below": sum(pi < lo for lo, pi in later), "points": len(later),
            "mean_curves": curves,
        }
    judged = by_lr[f"{lrs[0]:g}"]
    return {"by_lr": by_lr, "claim": {
        "lr": lrs[0], "holds": judged["pissa_ahead"] and judged["pissa_below_at_every_point"],
        "what": "PiSSA's final eval loss below LoRA's on the mean over the seeds (paired t-test p < 0.05) and its "
                "mean curve below LoRA's at every eval point after the start, both at rank 8, alpha 8, this lr"}}


def run_all(base: Path, lrs: list[float], seeds: list[int], steps: int, eval_every: int, max_chars: int,
            log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    rows = []
    for lr in lrs:
        for seed in seeds:
            for method, contender in METHODS.items():
                cfg = finetune_config(contender, steps, base, lr, max_chars, eval_every, seed=seed, alpha=ALPHA)
                run = run_contender(contender, cfg)
                losses = [r["final_eval_loss"] for r in run.ranks if r["final_eval_loss"] is not None]
                if not losses:
                    raise RuntimeError(f"{method} at lr {lr:g}, seed {seed}: no rank reported an eval loss")
                rows.append({"method": method, "lr": lr, "seed": seed, "final_eval_loss": losses[0],
                             **bytes_per_worker(run.ranks), "curve": curve(run), "wall_s": run.wall_s})
                log(f"{method} lr {lr:g} seed {seed}: eval {losses[0]:.4f} ({run.wall_s:.0f} s)")
    return rows


def plot(doc: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    judged = list(doc["by_lr"].values())
    fig, axes = plt.subplots(1, len(judged), figsize=(5 * len(judged), 4), squeeze=False)
    for ax, one in zip(axes[0], judged, strict=True):
        for method, points in one["mean_curves"].items():
            ax.plot([p["tokens"] for p in points], [p["eval_loss"] for p in points], marker="o", markersize=3,
                    label=f"{method} (final {one['mean_final'][method]:.4f})")
        p = one["paired"]["p"]
        ax.set(title=f"lr {one['lr']:g}: LoRA minus PiSSA {one['paired']['mean']:+.4f}, paired p {p:.2g}",
               xlabel="fine-tuning tokens, all workers", ylabel="eval loss, mean over seeds")
        ax.legend(fontsize=8)
    fig.suptitle(f"rank {RANK}, alpha {ALPHA}, identical settings, seeds {doc['seeds']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help=f"a smoke run: {QUICK}; --lrs and --seeds beside it override its own")
    parser.add_argument("--base", type=Path, help="fine-tune from this checkpoint instead of pretraining a base")
    parser.add_argument("--base-seed", type=int, default=0, help="seed of the base pretrained here (default 0)")
    parser.add_argument("--lrs", type=lambda t: comma_list(t, float, lambda v: min(v) > 0, "positive lrs"),
                        help=f"inner peak lrs, the first judged (default {','.join(f'{v:g}' for v in Plan.lrs)})")
    parser.add_argument("--seeds", type=lambda t: comma_list(t, int, lambda v: len(set(v)) == len(v) > 1,
                                                             "at least 2 distinct seeds"),
                        help=f"fine-tuning seeds (default {','.join(map(str, Plan.seeds))})")
    parser.add_argument("--out", help="result name in bench/results (default lowrank_equal, _quick with --quick)")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else Plan()
    lrs, seeds = args.lrs or list(plan.lrs), args.seeds or list(plan.seeds)
    out = args.out or ("lowrank_equal_quick" if args.quick else "lowrank_equal")
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lowband-equal-") as tmp:
        base, made = args.base, None
        if base is None:
            made = pretrain(plan.pretrain_steps, plan.max_chars, Path(tmp) / "base", seed=args.base_seed)
            base = made.checkpoint
            print(f"base pretrained: {made.base_eval_loss:.4f} on the fine-tuning plays ({made.wall_s:.0f} s)")
        if not base.is_file():
            parser.error(f"--base {base}: no such checkpoint file")
        rows = run_all(base, lrs, seeds, plan.steps, plan.eval_every, plan.max_chars)
    starts = sorted({p["eval_loss"] for r in rows for p in r["curve"] if p["step"] == 0})
    doc = {"seeds": seeds, "lrs": lrs, "rank": RANK, "alpha": ALPHA, "steps_per_worker": plan.steps,
           "max_chars": plan.max_chars,
           "base": str(args.base) if made is None else {"pretrained_steps": made.steps, "seed": args.base_seed},
           # Every run's eval at step 0, before any step: the base's own loss on the fine-tuning plays (one value
           # when both methods start from the base's exact outputs), whichever way the base came.
           "base_eval_loss_at_step_0": starts,
           **judge(rows, lrs, seeds)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    plot(doc, RESULTS / f"{out}.png")
    write_result(out, command_line("bench.lowrank_equal"), rows, COLUMNS, invocation_s=time.perf_counter() - began,
                 **doc)
    for key, one in doc["by_lr"].items():
        print(f"lr {key}: lora {one['mean_final']['lora']:.4f}, pissa {one['mean_final']['pissa']:.4f}, PiSSA ahead "
              f"on {one['paired']['wins']}/{len(seeds)} seeds, paired p {one['paired']['p']:.3g}, below LoRA at "
              f"{one['points_pissa_below']}/{one['points']} eval points")
    print(f"claim at lr {doc['claim']['lr']:g}: {'holds' if doc['claim']['holds'] else 'does not hold'}")


if __name__ == "__main__":
    main()
