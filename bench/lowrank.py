"""Low-rank fine-tuning under DiLoCo: full fine-tuning vs LoRA, PiSSA, GaLore and LoRA over SparseLoCo, from the
same pretrained checkpoint, on the same token budget, in one invocation.

    python -m bench.lowrank [--quick] [--pretrain-steps 4000] [--steps 300] [--contenders full,lora-r8,...]
                            [--lrs pissa-r8=0.01,...] [--weight-decay W] [--model n_embd=192,n_head=6] [--seed S]
                            [--lr-sweep-json FILE] [--out lowrank]
    python -m bench.lowrank --sweep 0.001,0.003 --sweep-out FILE [--base CHECKPOINT] [--seed 1]   # the lr sweep

Run it inside a loopback-only namespace: `deploy/loopback.sh .venv/bin/python -m bench.lowrank`.

Model: the default GPT of worker/model.py (bench/lowrank_runs.py MODEL: 2 layers, 128 wide, 4 heads, context 64;
413k parameters; `--model` replaces fields of it, e.g. a wider one), batch 16 x 64 characters per worker. Rank 8
is 1/16 of the width, and the adapters (32,768 factor entries on qkv, both proj and fc of both blocks) are 1/12.6
of the weights.

1. The base: DiLoCo (H=30, outer lr 1.0, momentum 0.5: the tuned outer step of BENCHMARKS.md), 4 workers, inner
   lr 3e-3, `data.plays: pretrain` (every play but the 4 romances of worker/data.py FINETUNE_PLAYS),
   `--pretrain-steps` inner steps per worker (default 4000: 16.4M characters, ~3.8 passes over the pretraining
   text), in 4 fresh processes over all-gather (as the contenders; ~35% faster on 2 cores than
   `deploy.inproc.run_inproc`'s 4 threads under one GIL), rank 0 saving the final replica as a plain checkpoint
   (`Session.save_checkpoint`, the `params` that `init_from` reads) in a temporary directory. Not a contender:
   its eval loss on the romances' eval text before any fine-tuning is `base_eval_loss` (and the `pretrain` block,
   with its eval points on the pretraining plays every 500 steps; each contender's first eval point, at step 0,
   is `base_eval_loss`).
2. Every contender fine-tunes from that checkpoint (`init_from`) on `data.plays: finetune` (the romances),
   `--steps` inner steps per worker (the same token budget for all; default 300: 1.2M characters, ~2.6 passes
   over the romances' training text, 7.5% of the pretraining tokens), 4 workers, H=30:
   - full: every weight trains, dense DiLoCo.
   - lora-r8: peft LoRA (rank 8, alpha 16) on every attention and MLP projection (qkv, proj, fc); only the
     factors train and cross the wire, dense DiLoCo.
   - pissa-r8: the same layers with peft's PiSSA init, rank 8, alpha 8: alpha = rank as in the PiSSA paper
     (bench/lowrank_runs.py PISSA_ALPHA says why).
   - galore-r8: every weight trains, AdamW's moments in GaLore's rank-8 projection (proj gap 200, scale 0.25);
     dense DiLoCo (GaLore saves optimizer memory, never bytes).
   - lora-r8-sparseloco: LoRA r8 under SparseLoCo with its defaults (top-64 of every 4096, 2-bit values, EF
     decay 0.95, outer SGD lr 1, no momentum) except H, 30 like the others.
   `--seed` is the run seed of the base and of every contender (model init, data streams, LoRA's random A).

Why all-gather in fresh processes: per-worker peak memory is only honest if a worker is a process of its own
that ran nothing else. `worker.spawn.spawn_on_loopback` starts 4 fresh processes per contender (forked from a
server that imported torch and nothing else; one torch thread each) that run `worker.runners.run_allgather_rank`
(cluster.transport allgather: every rank aggregates, so there is no coordinator process to account for); rank 0
evaluates (it alone holds eval batches and eval points; the loss is that of the replica every rank shares,
`replicas_agree`). Bytes are what each rank's all-gather moved (it receives the other 3 ranks' updates), per worker,
both directions, averaged over workers.
The gRPC star would need a coordinator process beside them (and bench.overlap's long-lived worker pool would
carry one contender's peak into the next); the in-process runner shares one process among the workers.

Memory: `peak_rss_bytes` is each rank's own peak resident set (VmHWM; its max over ranks, and the list by
rank). It is not `WorkerResult.peak_rss_bytes` (getrusage's ru_maxrss, kept per rank as
`peak_rss_rusage_bytes_per_worker`): on Linux that keeps the high-water mark of the image before exec, so a
spawned child reports at least its parent's RSS at the fork. `rss_at_start_bytes` is the rank's RSS once the
runtime every contender loads (torch, torch._dynamo, the session and data modules) and the contender's own
libraries (peft, galore-torch) are imported, before the session is built; `training_rss_bytes` = peak - start
(max over ranks): the corpus, model, optimizer, activations and exchange buffers. With a 413k-parameter model
the runtime dominates the peak (peft alone imports ~200 MB of transformers), so the peak says more about
libraries than about the method; `optimizer_state_bytes` (bytes of every tensor in the inner optimizer's state,
worker/optimizers.py) and `trainable_params` are the method's own figures.

Learning rates: each contender's inner peak lr (`lr` in its row; the schedule is the default warmup 30 and
cosine to 0.1x; weight decay the default 0.1 unless --weight-decay). Picked by `--sweep` at this benchmark's
budget (4000 pretraining and 300 fine-tuning steps) with `--seed 1`: from a base pretrained the same way but
from another seed (its own init and data order), fine-tuned with seed 1's data streams; every contender at 1e-3
and 3e-3, then, while its best lr was at an edge of what it ran, at the next half-decade step beyond
(LR_LADDER), so each ends at an interior best; scored by the final eval loss on the romances' eval text. The
benchmark runs at seed 0, so its figures are not the sweep's own draws, but the eval text is the same one. The
sweep is stored as `lr_sweep` when given by `--lr-sweep-json`.

Ratios against full: `bytes_vs_full`, `optimizer_state_vs_full`, `eval_loss_vs_full` (contender / full).
Targets (issue): pissa-r8's eval loss within 3% of full's, at least 10x fewer total bytes per worker, at least
5x less optimizer state; pissa-r8 ahead of lora-r8 (lower eval loss) at equal steps. Stored as `targets`
with pass/fail (None where a row is missing). Here that last one compares each at its own best lr and LoRA at
alpha 16; bench.lowrank_equal makes the PiSSA paper's own comparison, both at alpha = rank and one lr, over seeds.

Writes bench/results/<out>.json and <out>.png (eval loss against fine-tuning tokens per contender; bytes per
worker and optimizer state per contender, log scale). `--quick` is a smoke run (tiny corpus via
data.max_chars, two rounds each); its result goes to <out>_quick unless --out says otherwise.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import RESULTS, comma_list, command_line, write_result
from bench.lowrank_runs import (
    BATCH,
    CONTENDERS,
    INNER_STEPS,
    LRS,
    MODEL,
    PRETRAIN_LR,
    WORKERS,
    ContenderRun,
    as_dict,
    bytes_per_worker,
    finetune_config,
    pretrain,
    run_contender,
    sweep_run,
)

COLUMNS = ["contender", "lr", "eval_loss", "eval_loss_vs_full", "bytes_total_per_worker", "bytes_vs_full",
           "optimizer_state_bytes", "optimizer_state_vs_full", "trainable_params", "peak_rss_bytes",
           "training_rss_bytes", "tokens", "wall_s"]
LOSS_TARGET = 1.03  # pissa-r8's eval loss at most this times full's
BYTES_TARGET = 10.0  # full's total bytes per worker over pissa-r8's, at least
OPTIMIZER_TARGET = 5.0  # full's optimizer state over pissa-r8's, at least


@dataclass
class Plan:
    """What one invocation runs (see the module docstring)."""

    pretrain_steps: int = 4000
    steps: int = 300
    contenders: list[str] = field(default_factory=lambda: list(CONTENDERS))
    lrs: dict[str, float] = field(default_factory=lambda: dict(LRS))
    max_chars: int = 0  # the whole corpus
    eval_every: int = 30  # fine-tuning eval points every round
    weight_decay: float | None = None  # fine-tuning's inner AdamW weight decay; None: TrainConfig's default
    model: dict[str, Any] = field(default_factory=lambda: dict(MODEL))  # the GPT's shape, base and contenders
    seed: int = 0  # the run seed of the base and every contender (model init, data streams, LoRA's A)
    pretrain_eval_every: int = 500  # the base's eval points on the pretraining plays' eval text


QUICK = Plan(pretrain_steps=60, steps=60, max_chars=200_000, eval_every=30)


def make_row(run: ContenderRun, lr: float) -> dict[str, Any]:
    """A table row of one contender (ratios against full are added by `add_ratios`)."""
    ranks = run.ranks
    evaluated = [r for r in ranks if r["final_eval_loss"] is not None]
    peaks = [int(r["peak_rss_bytes"]) for r in ranks]
    starts = [int(r["rss_at_start_bytes"]) for r in ranks]
    lowrank = run.cfg.lowrank
    return {
        "contender": run.contender,
        "method": lowrank.method if lowrank else "full",
        "protocol": run.cfg.protocol.kind,
        "rank": lowrank.rank if lowrank else None,
        "alpha": lowrank.alpha if lowrank and lowrank.method != "galore" else None,
        "lr": lr,
        "weight_decay": run.cfg.train.weight_decay,
        "eval_loss": evaluated[0]["final_eval_loss"] if evaluated else None,
        "eval_loss_vs_full": None,
        **bytes_per_worker(ranks),
        "bytes_vs_full": None,
        "optimizer_state_bytes": max(int(r["optimizer_state_bytes"]) for r in ranks),
        "optimizer_state_vs_full": None,
        "trainable_params": max(int(r["trainable_params"]) for r in ranks),
        "peak_rss_bytes": max(peaks),
        "peak_rss_bytes_per_worker": peaks,
        "rss_at_start_bytes": max(starts),
        "training_rss_bytes": max(p - s for p, s in zip(peaks, starts, strict=True)),
        "peak_rss_rusage_bytes_per_worker": [int(r["peak_rss_rusage_bytes"]) for r in ranks],
        "tokens": sum(int(r["tokens"]) for r in ranks),
        "steps": max(int(r["steps"]) for r in ranks),
        "rounds": max(int(r["rounds"]) for r in ranks),
        "train_s": max(float(r["train_s"]) for r in ranks),
        "wall_s": run.wall_s,
        "base_hashes_agree": len({r["base_hash"] for r in ranks}) == 1,
        "replicas_agree": len({r["param_hash"] for r in ranks}) == 1,
        "resyncs": sum(int(r["resyncs"]) for r in ranks),
    }


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """bytes_vs_full, optimizer_state_vs_full, eval_loss_vs_full: the contender's figure over full's."""
    full = next((r for r in rows if r["contender"] == "full"), None)
    if full is None:
        return
    for r in rows:
        for key, base in (("bytes_vs_full", "bytes_total_per_worker"),
                          ("optimizer_state_vs_full", "optimizer_state_bytes"), ("eval_loss_vs_full", "eval_loss")):
            if r[base] is not None and full[base]:
                r[key] = r[base] / full[base]


def targets(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's targets, pass/fail (None: a row they need is missing or has no figure)."""
    by = {r["contender"]: r for r in rows}
    full, pissa, lora = by.get("full"), by.get("pissa-r8"), by.get("lora-r8")

    def ratio(a: dict[str, Any] | None, b: dict[str, Any] | None, key: str) -> float | None:
        if a is None or b is None or a.get(key) is None or not b.get(key):
            return None
        return float(a[key]) / float(b[key])

    loss = ratio(pissa, full, "eval_loss")
    fewer_bytes = ratio(full, pissa, "bytes_total_per_worker")
    less_state = ratio(full, pissa, "optimizer_state_bytes")
    ahead = None
    if pissa and lora and pissa["eval_loss"] is not None and lora["eval_loss"] is not None:
        ahead = pissa["eval_loss"] - lora["eval_loss"]
    return {
        "pissa_eval_loss_vs_full": {"value": loss, "target": f"<= {LOSS_TARGET}",
                                    "pass": None if loss is None else loss <= LOSS_TARGET},
        "pissa_bytes_reduction_vs_full": {"value": fewer_bytes, "target": f">= {BYTES_TARGET}",
                                          "pass": None if fewer_bytes is None else fewer_bytes >= BYTES_TARGET},
        "pissa_optimizer_state_reduction_vs_full": {
            "value": less_state, "target": f">= {OPTIMIZER_TARGET}",
            "pass": None if less_state is None else less_state >= OPTIMIZER_TARGET},
        "pissa_eval_loss_minus_lora": {"value": ahead, "target": "< 0 (pissa-r8 ahead of lora-r8, equal steps)",
                                       "pass": None if ahead is None else ahead < 0},
    }


def model_note(model: dict[str, Any]) -> str:
    """The GPT's shape in words, saying whether it is worker/model.py's default."""
    shape = (f"{model['n_layer']} layers, {model['n_embd']} wide, {model['n_head']} heads, "
             f"context {model['block_size']}")
    return f"{'the default' if model == MODEL else 'a'} GPT of worker/model.py ({shape})"


def curve(run: ContenderRun) -> list[dict[str, Any]]:
    """Rank 0's eval points: eval loss against the fine-tuning tokens of all workers so far."""
    evaluated = [r for r in run.ranks if r["evals"]]
    if not evaluated:
        return []
    return [{"step": e["step"], "tokens": e["tokens_total"], "eval_loss": e["eval_loss"],
             "bytes_total": e["bytes_sent"] + e["bytes_received"]} for e in evaluated[0]["evals"]]


def collect(plan: Plan, log: Callable[[str], None] = print, work_dir: Path | None = None) -> dict[str, Any]:
    """Pretrain the base, fine-tune every contender from it; the JSON document's parts (rows, targets, ...)."""
    rows: list[dict[str, Any]] = []
    curves: dict[str, list[dict[str, Any]]] = {}
    failures: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="lowrank-", dir=work_dir) as tmp:
        log(f"pretraining the base: {plan.pretrain_steps} steps per worker, {WORKERS} workers, model {plan.model}")
        base = pretrain(plan.pretrain_steps, plan.max_chars, Path(tmp) / "pretrain", plan.model, plan.seed,
                        plan.pretrain_eval_every)
        log(f"base: eval {base.eval_loss_pretrain_plays} on the pretraining plays, {base.base_eval_loss:.4f} on the "
            f"fine-tuning plays, {base.wall_s:.1f} s")
        for contender in plan.contenders:
            lr = plan.lrs[contender]
            cfg = finetune_config(contender, plan.steps, base.checkpoint, lr, plan.max_chars, plan.eval_every,
                                  plan.weight_decay, plan.model, plan.seed)
            try:
                run = run_contender(contender, cfg)
            except Exception as err:  # one contender failing leaves the others' rows
                failures.append({"contender": contender, "error": str(err)[-3000:]})
                log(f"{contender}: FAILED {str(err).splitlines()[0] if str(err) else type(err).__name__}")
                continue
            row = make_row(run, lr)
            rows.append(row)
            curves[contender] = curve(run)
            log(f"{contender} lr {lr:g}: eval {row['eval_loss']}, {row['bytes_total_per_worker']:.4g} B/worker, "
                f"optimizer {row['optimizer_state_bytes']} B, peak RSS {row['peak_rss_bytes'] / 2**20:.0f} MiB, "
                f"{row['wall_s']:.1f} s")
    add_ratios(rows)
    pretrained = as_dict(base)
    pretrained.pop("checkpoint")  # a temporary file, gone
    return {
        "rows": rows,
        "targets": targets(rows),
        "base_eval_loss": base.base_eval_loss,
        "pretrain": pretrained,
        "curves": curves,
        "failures": failures,
        "model": plan.model,
        "model_note": model_note(plan.model),
        "seed": plan.seed,
        "parameters": next((r["trainable_params"] for r in rows if r["contender"] == "full"), None),
        "weight_decay": plan.weight_decay,
        "batch_size": BATCH,
        "workers": WORKERS,
        "inner_steps": INNER_STEPS,
        "steps_per_worker": plan.steps,
        "pretrain_steps_per_worker": plan.pretrain_steps,
        "pretrain_lr": PRETRAIN_LR,
        "max_chars": plan.max_chars,
        "transport": "allgather (4 fresh processes per contender, rank 0 evaluates)",
    }


def plot(doc: dict[str, Any], path: Path) -> Path:
    """Eval loss against fine-tuning tokens per contender; bytes per worker and optimizer state (log bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = doc["rows"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5), gridspec_kw={"width_ratios": [2, 1, 1]})
    ax = axes[0]
    colors: dict[str, Any] = {}
    for name, points in doc["curves"].items():
        if points:
            (line,) = ax.plot([p["tokens"] for p in points], [p["eval_loss"] for p in points], marker="o",
                              markersize=3, label=name)
            colors[name] = line.get_color()
    if doc.get("base_eval_loss") is not None:
        ax.axhline(doc["base_eval_loss"], color="grey", linewidth=0.8, linestyle=":", label="base (no fine-tuning)")
    ax.set(xlabel="fine-tuning tokens, all workers", ylabel="eval loss (fine-tuning plays)",
           title=f"{doc['workers']} workers, H={doc['inner_steps']}")
    ax.legend(fontsize=8)
    names = [r["contender"] for r in rows]
    for ax, key, title in ((axes[1], "bytes_total_per_worker", "bytes per worker, both ways"),
                           (axes[2], "optimizer_state_bytes", "inner optimizer state, bytes")):
        values = [r[key] or 0 for r in rows]
        ax.bar(range(len(rows)), values, color=[colors.get(n, "C0") for n in names])
        ax.set_xticks(range(len(rows)), names, rotation=30, ha="right", fontsize=8)
        ax.set(yscale="log", title=title)
        for i, v in enumerate(values):
            if v:
                ax.text(i, v, f"{v:.2g}", ha="center", va="bottom", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


LR_LADDER = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1]  # half-decade steps


def sweep(plan: Plan, start: list[float], out: Path, base: Path | None, log: Callable[[str], None] = print) -> None:
    """The lr sweep behind LRS: every contender at every lr of `start`, then, while its best lr is at an edge of
    what it ran, at the next lr of LR_LADDER beyond that edge (so each ends at an interior best, or the ladder's
    end). Fine-tunes from `base` (a checkpoint), or from a base pretrained here into <out stem>-base/.
    Writes `out` (JSON) after every point."""
    if base is None:
        made = pretrain(plan.pretrain_steps, plan.max_chars, out.with_name(out.stem + "-base"), plan.model, plan.seed,
                        plan.pretrain_eval_every)
        log(f"base pretrained into {made.checkpoint}: {made.base_eval_loss:.4f} on the fine-tuning plays")
        base = made.checkpoint
    doc: dict[str, Any] = {"grid_start": start, "ladder": LR_LADDER, "pretrain_steps_per_worker": plan.pretrain_steps,
                           "steps_per_worker": plan.steps, "max_chars": plan.max_chars, "base": str(base),
                           "model": plan.model, "seed": plan.seed, "weight_decay": plan.weight_decay,
                           "scored_by": "final eval loss on the fine-tuning plays' eval text",
                           "runs": [], "best": {}}
    for contender in plan.contenders:
        losses: dict[float, float] = {}

        def point(lr: float, contender: str = contender, losses: dict[float, float] = losses) -> None:
            run = sweep_run(contender, lr, plan.steps, base, plan.max_chars, plan.weight_decay, plan.model, plan.seed)
            doc["runs"].append(run)
            losses[lr] = run["eval_loss"] if run["eval_loss"] is not None else math.inf
            log(f"sweep {contender} lr {lr:g}: eval {run['eval_loss']}, {run['wall_s']:.1f} s")
            out.write_text(json.dumps(doc, indent=2) + "\n")

        for lr in start:
            point(lr)
        while len(losses) < len(start) + 3:  # at most 3 points beyond the start
            best = min(losses, key=lambda k: losses[k])
            if best == min(losses):
                beyond = [lr for lr in LR_LADDER if lr < best * 0.9]
                if not beyond:
                    break
                point(max(beyond))
            elif best == max(losses):
                beyond = [lr for lr in LR_LADDER if lr > best * 1.1]
                if not beyond:
                    break
                point(min(beyond))
            else:
                break
        doc["best"][contender] = min(losses, key=lambda k: losses[k])
        out.write_text(json.dumps(doc, indent=2) + "\n")
    log(f"best lrs: {doc['best']}")


def _contenders(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    if not names or any(n not in CONTENDERS for n in names):
        raise argparse.ArgumentTypeError(f"choose contenders from {', '.join(CONTENDERS)}, got {text!r}")
    return names


def _lrs(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for item in (s.strip() for s in text.split(",") if s.strip()):
        name, sep, value = item.partition("=")
        try:
            lr = float(value)
        except ValueError:
            lr = -1.0
        if not sep or name not in CONTENDERS or not lr > 0 or not math.isfinite(lr):
            raise argparse.ArgumentTypeError(f"expected contender=lr pairs like pissa-r8=0.01, got {item!r}")
        out[name] = lr
    return out


MODEL_FIELDS = ("n_layer", "n_head", "n_embd", "block_size")


def parse_model(text: str) -> dict[str, Any]:
    """`--model n_embd=192,n_head=6`: MODEL with those fields replaced, checked by ModelConfig (positive
    integers, heads dividing the width); an argparse error naming the problem otherwise."""
    from pydantic import ValidationError

    from protocols.config import ModelConfig

    shape = dict(MODEL)
    for item in (s.strip() for s in text.split(",") if s.strip()):
        name, sep, value = item.partition("=")
        if not sep or name.strip() not in MODEL_FIELDS or not value.strip().lstrip("-").isdigit():
            raise argparse.ArgumentTypeError(
                f"expected {'/'.join(MODEL_FIELDS)}=integer pairs like n_embd=192,n_head=6, got {item!r}")
        shape[name.strip()] = int(value)
    try:
        ModelConfig(**shape)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'model'}: {e['msg']}" for e in err.errors())
        raise argparse.ArgumentTypeError(f"--model {text!r}: {problems}") from None
    return shape


def _floats(text: str) -> list[float]:
    return sorted(comma_list(text, float, lambda v: min(v) > 0, "positive numbers like 0.003,0.01"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help=f"a smoke run: {QUICK.pretrain_steps} pretraining and {QUICK.steps} fine-tuning steps, "
                             f"max_chars {QUICK.max_chars}; flags given beside it override these")
    parser.add_argument("--pretrain-steps", type=int,
                        help=f"pretraining steps per worker (default {Plan.pretrain_steps})")
    parser.add_argument("--steps", type=int,
                        help=f"fine-tuning steps per worker, every contender (default {Plan.steps})")
    parser.add_argument("--contenders", type=_contenders,
                        help=f"comma-separated, from {','.join(CONTENDERS)} (default all)")
    parser.add_argument("--lrs", type=_lrs, default={}, help="per-contender inner lr overrides, e.g. pissa-r8=0.01")
    parser.add_argument("--max-chars", type=int, help="data.max_chars: characters read of the corpus (0 = all)")
    parser.add_argument("--eval-every", type=int, help=f"fine-tuning eval every N steps (default {Plan.eval_every})")
    parser.add_argument("--weight-decay", type=float,
                        help="fine-tuning's inner AdamW weight decay, every contender (default: the config default)")
    parser.add_argument("--model", type=parse_model,
                        help="the GPT's shape, fields of MODEL replaced, e.g. n_embd=192,n_head=6 (default: "
                             f"{','.join(f'{k}={v}' for k, v in MODEL.items())})")
    parser.add_argument("--seed", type=int, help="run seed of the base and every contender (default 0)")
    parser.add_argument("--lr-sweep-json", type=Path, help="a JSON file of the lr sweep, stored as lr_sweep")
    parser.add_argument("--out", help="result name in bench/results (default lowrank; lowrank_quick with --quick)")
    parser.add_argument("--sweep", type=_floats,
                        help="run the lr sweep instead of the benchmark, starting from these lrs (e.g. 0.003,0.01)")
    parser.add_argument("--sweep-out", type=Path, default=Path("lowrank_sweep.json"), help="the sweep's JSON file")
    parser.add_argument("--base", type=Path, help="sweep only: fine-tune from this checkpoint instead of pretraining")
    args = parser.parse_args(argv)
    base = QUICK if args.quick else Plan()
    plan = Plan(
        pretrain_steps=args.pretrain_steps or base.pretrain_steps,
        steps=args.steps or base.steps,
        contenders=args.contenders or base.contenders,
        lrs={**base.lrs, **args.lrs},
        max_chars=base.max_chars if args.max_chars is None else args.max_chars,
        eval_every=args.eval_every or base.eval_every,
        weight_decay=base.weight_decay if args.weight_decay is None else args.weight_decay,
        model=args.model or base.model,
        seed=base.seed if args.seed is None else args.seed,
    )
    if plan.steps < 1 or plan.pretrain_steps < 1:
        parser.error("--steps and --pretrain-steps must be >= 1")
    if args.sweep:
        sweep(plan, args.sweep, args.sweep_out, args.base)
        return
    out = args.out or ("lowrank_quick" if args.quick else "lowrank")
    load_before = os.getloadavg()[0]  # other jobs on the machine disturb the timings: say how busy it was
    began = time.perf_counter()
    doc = collect(plan)
    rows = doc.pop("rows")
    if args.lr_sweep_json is not None:
        doc["lr_sweep"] = json.loads(args.lr_sweep_json.read_text())
    RESULTS.mkdir(parents=True, exist_ok=True)
    plot({**doc, "rows": rows}, RESULTS / f"{out}.png")
    print(f"base_eval_loss (pretrained base on the fine-tuning plays, before fine-tuning): {doc['base_eval_loss']:.4f}")
    write_result(out, command_line("bench.lowrank"), rows, COLUMNS, **doc, baseline="full",
                 invocation_s=time.perf_counter() - began, load_average_1min=[load_before, os.getloadavg()[0]])
    for name, t in doc["targets"].items():
        verdict = "n/a" if t["pass"] is None else "pass" if t["pass"] else "FAIL"
        print(f"target {name}: {t['value']} (want {t['target']}): {verdict}")
    if doc["failures"]:
        print(f"{len(doc['failures'])} run(s) failed: see 'failures' in the JSON")


if __name__ == "__main__":
    main()
