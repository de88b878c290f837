"""The runs of bench.lowrank: the pretrained base and each fine-tuning contender (4 fresh processes over
all-gather each), what a rank measures of its own memory, and the points of the lr sweep.

Spawned ranks import this module (it must stay importable without side effects): `_rank` is the per-rank
entry point handed to `worker.spawn.spawn_on_loopback`.
"""

from __future__ import annotations

import importlib
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from protocols.config import RunConfig, parse_config

WORKERS = 4
INNER_STEPS = 30  # H, every fine-tuning contender and the pretraining
MODEL: dict[str, Any] = {"n_layer": 2, "n_head": 4, "n_embd": 128, "block_size": 64}  # the default GPT
BATCH = 16
EVAL_BATCHES = 24  # 24 x 16 windows of 64 characters, evenly spaced over the fine-tuning plays' eval text
DILOCO_OUTER = {"outer_lr": 1.0, "outer_momentum": 0.5}  # the tuned outer step (BENCHMARKS.md, bench.wire_bytes)
RANK = 8
ALPHA = 16  # LoRA's adapter update is (alpha / rank) B A = 2 B A
# PiSSA at alpha = rank, as in its paper (arXiv:2404.02948) and LlamaFactory's PiSSA script: peft's PiSSA init
# divides the top singular values by alpha / rank before splitting them between A and B, so only at alpha = rank
# do the factors hold sqrt(S) as in the paper (under Adam another alpha acts roughly as another lr).
PISSA_ALPHA = RANK
RANK_TIMEOUT_S = 900.0

# Contender -> (protocol kind, lowrank block or None). SparseLoCo keeps its defaults (top-64 of every 4096, 2-bit
# values, EF decay 0.95, outer SGD lr 1 without momentum) except H, which is every contender's 30.
CONTENDERS: dict[str, tuple[str, dict[str, Any] | None]] = {
    "full": ("diloco", None),
    "lora-r8": ("diloco", {"method": "lora", "rank": RANK, "alpha": ALPHA}),
    "pissa-r8": ("diloco", {"method": "pissa", "rank": RANK, "alpha": PISSA_ALPHA}),
    "galore-r8": ("diloco", {"method": "galore", "rank": RANK}),
    "lora-r8-sparseloco": ("sparseloco", {"method": "lora", "rank": RANK, "alpha": ALPHA}),
}
# Inner AdamW peak lr of each contender, picked by the sweep the module docstring of bench.lowrank describes.
LRS: dict[str, float] = {
    "full": 1e-3,
    "lora-r8": 1e-2,
    "pissa-r8": 3e-3,
    "galore-r8": 3e-3,
    "lora-r8-sparseloco": 1e-3,
}
PRETRAIN_LR = 3e-3  # the default inner lr


def protocol_section(kind: str) -> dict[str, Any]:
    section: dict[str, Any] = {"kind": kind, "inner_steps": INNER_STEPS}
    if kind == "diloco":
        section.update(DILOCO_OUTER)
    return section


def _common(name: str, plays: str, steps: int, lr: float, max_chars: int, eval_every: int,
            model: dict[str, Any] | None, seed: int) -> dict[str, Any]:
    return {
        "name": name,
        "seed": seed,
        "model": MODEL if model is None else model,
        "data": {"batch_size": BATCH, "max_chars": max_chars, "plays": plays},
        "train": {"steps": steps, "lr": lr, "eval_batches": EVAL_BATCHES, "eval_every_steps": eval_every},
    }


def pretrain_config(steps: int, max_chars: int, model: dict[str, Any] | None = None, seed: int = 0,
                    eval_every: int = 1_000_000) -> RunConfig:
    """The base: DiLoCo H=30, 4 all-gather ranks, every play but the fine-tuning ones; evals on their eval text
    every `eval_every` steps and at the end. `model`: the GPT's shape (None: MODEL); `seed`: the run seed."""
    data = _common("lowrank-pretrain", "pretrain", steps, PRETRAIN_LR, max_chars, eval_every, model, seed)
    return parse_config({**data, "protocol": protocol_section("diloco"),
                         "cluster": {"workers": WORKERS, "transport": "allgather"}})


def finetune_config(contender: str, steps: int, init_from: str | Path, lr: float, max_chars: int,
                    eval_every: int, weight_decay: float | None = None, model: dict[str, Any] | None = None,
                    seed: int = 0, alpha: int | None = None) -> RunConfig:
    """`contender` fine-tuning the base at `init_from` on the fine-tuning plays: 4 all-gather ranks (inner AdamW
    weight decay `weight_decay`, or the default's; adapter alpha `alpha`, or the contender's). `model` must be the
    base's shape."""
    kind, lowrank = CONTENDERS[contender]
    if alpha is not None:
        if lowrank is None or "alpha" not in lowrank:
            raise ValueError(f"{contender} has no adapters, so no alpha to set")
        lowrank = {**lowrank, "alpha": alpha}
    data = _common(f"lowrank-{contender}", "finetune", steps, lr, max_chars, eval_every, model, seed)
    if weight_decay is not None:
        data["train"]["weight_decay"] = weight_decay
    return parse_config({**data, "protocol": protocol_section(kind), "lowrank": lowrank, "init_from": str(init_from),
                         "cluster": {"workers": WORKERS, "transport": "allgather"}})


def base_eval_config(steps: int, init_from: str | Path, max_chars: int, model: dict[str, Any] | None = None,
                     seed: int = 0) -> RunConfig:
    """The base itself on the fine-tuning plays' eval text (what every contender's rank 0 evaluates)."""
    data = _common("lowrank-base", "finetune", steps, PRETRAIN_LR, max_chars, 1_000_000, model, seed)
    return parse_config({**data, "init_from": str(init_from)})


@dataclass
class Pretrained:
    checkpoint: Path
    steps: int
    tokens: int
    eval_loss_pretrain_plays: float | None
    base_eval_loss: float  # on the fine-tuning plays' eval text, before any fine-tuning
    bytes_total_per_worker: float
    wall_s: float
    evals: list[dict[str, Any]] = field(default_factory=list)


def _pretrain_rank(rank: int, world_size: int, init_method: str, cfg: RunConfig, path: str) -> dict[str, Any]:
    """One spawned rank of the pretraining: `run_allgather_rank`'s loop, and rank 0 saves the final replica as a
    plain checkpoint (`Session.save_checkpoint`: `params` at the top level, what `init_from` reads) and
    evaluates it on the fine-tuning plays."""
    from protocols.registry import build_protocol
    from worker.loop import RoundLoop
    from worker.session import Session
    from worker.transports.allgather import AllGatherTransport, process_group

    protocol = build_protocol(cfg)
    with process_group(rank, world_size, init_method, "gloo", RANK_TIMEOUT_S):
        session = Session.build(cfg, rank, world_size, evaluates=rank == 0)
        loop = RoundLoop(session, AllGatherTransport(cfg, protocol, rank), protocol)
        loop.run()
        result = asdict(loop.finish())
        if rank == 0:
            replica = loop.final_replica
            session.save_checkpoint(path, replica.params, replica.round, cfg.name)
            base_cfg = base_eval_config(cfg.train.steps, path, cfg.data.max_chars, cfg.model.model_dump(), cfg.seed)
            base = Session.build(base_cfg, 0, world_size)
            result["base_eval_loss"] = base.evaluate()
        return result


def pretrain(steps: int, max_chars: int, run_dir: Path, model: dict[str, Any] | None = None, seed: int = 0,
             eval_every: int = 1_000_000) -> Pretrained:
    """Train the base in 4 fresh processes over all-gather (`_pretrain_rank`), writing `run_dir/checkpoint.pt`;
    its eval loss on the fine-tuning plays."""
    from worker.spawn import spawn_on_loopback

    began = time.perf_counter()
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt = run_dir / "checkpoint.pt"
    cfg = pretrain_config(steps, max_chars, model, seed, eval_every)
    ranks = spawn_on_loopback(_pretrain_rank, WORKERS, args=(cfg, str(ckpt)), num_threads=1)
    wall = time.perf_counter() - began
    return Pretrained(
        checkpoint=ckpt,
        steps=steps,
        tokens=sum(int(r["tokens"]) for r in ranks),
        eval_loss_pretrain_plays=ranks[0]["final_eval_loss"],
        base_eval_loss=float(ranks[0]["base_eval_loss"]),
        bytes_total_per_worker=sum(r["bytes_total"] for r in ranks) / len(ranks),
        wall_s=wall,
        evals=ranks[0]["evals"],
    )


def sweep_run(contender: str, lr: float, steps: int, init_from: str | Path, max_chars: int,
              weight_decay: float | None = None, model: dict[str, Any] | None = None,
              seed: int = 0) -> dict[str, Any]:
    """One point of the lr sweep: `contender` at inner lr `lr`, run exactly as the benchmark runs it."""
    cfg = finetune_config(contender, steps, init_from, lr, max_chars, 1_000_000, weight_decay, model, seed)
    run = run_contender(contender, cfg)
    losses = [r["final_eval_loss"] for r in run.ranks if r["final_eval_loss"] is not None]
    return {"contender": contender, "lr": lr, "weight_decay": cfg.train.weight_decay,
            "eval_loss": losses[0] if losses else None, "wall_s": run.wall_s}


def _status_bytes(key: str) -> int:
    """A field of /proc/self/status (VmRSS, VmHWM), in bytes; 0 where there is none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


# Imported lazily by every contender's training (torch.optim's first step imports torch._dynamo; the session
# reads the corpus): imported before `rss_at_start_bytes` so that figure is the same runtime for all.
COMMON_IMPORTS = ["torch._dynamo", "worker.session", "worker.data"]


def preload(cfg: RunConfig) -> list[str]:
    """What a contender's ranks import before training: the common runtime, and the libraries the method
    imports lazily (peft for adapters, galore-torch for GaLore)."""
    if cfg.lowrank is None:
        return list(COMMON_IMPORTS)
    return [*COMMON_IMPORTS, "peft" if cfg.lowrank.method in ("lora", "pissa") else "galore_torch"]


def _rank(rank: int, world_size: int, init_method: str, cfg: RunConfig, modules: list[str]) -> dict[str, Any]:
    """One spawned rank: import what the contender uses, note the resident memory then, train it
    (`run_allgather_rank`), and report this process image's own peak (VmHWM) beside the WorkerResult's."""
    from worker.optimizers import quiet_bitsandbytes
    from worker.runners import run_allgather_rank

    quiet_bitsandbytes()
    for module in modules:
        importlib.import_module(module)
    at_start = _status_bytes("VmRSS")
    out = run_allgather_rank(rank, world_size, init_method, cfg, num_threads=1, timeout_s=RANK_TIMEOUT_S)
    # WorkerResult.peak_rss_bytes is getrusage's ru_maxrss, which on Linux keeps the high-water mark of the
    # image before exec: a spawned child (fork + exec) reports at least the parent's RSS at the fork.
    # VmHWM is this process image's own.
    out["peak_rss_rusage_bytes"] = out["peak_rss_bytes"]
    out["peak_rss_bytes"] = _status_bytes("VmHWM") or out["peak_rss_bytes"]
    out["rss_at_start_bytes"] = at_start
    for drop in ("state_hashes", "spans", "round_seconds", "compute_seconds", "blocked_seconds"):
        out.pop(drop, None)  # not used here; keeps the pickled results small
    return out


@dataclass
class ContenderRun:
    contender: str
    cfg: RunConfig
    ranks: list[dict[str, Any]]  # by rank: WorkerResult fields plus rank, peak_rss_*, rss_at_start_bytes
    wall_s: float


def run_contender(contender: str, cfg: RunConfig) -> ContenderRun:
    """4 fresh spawned processes (one torch thread each), one all-gather rank each; rank 0 evaluates."""
    from worker.spawn import spawn_on_loopback

    began = time.perf_counter()
    ranks = spawn_on_loopback(_rank, WORKERS, args=(cfg, preload(cfg)), num_threads=1)
    return ContenderRun(contender, cfg, ranks, time.perf_counter() - began)


def bytes_per_worker(ranks: list[dict[str, Any]]) -> dict[str, float]:
    """What a contender's ranks moved, both ways, as the mean per worker."""
    n = len(ranks)
    return {f"bytes_{way}_per_worker": sum(r[f"bytes_{way}"] for r in ranks) / n
            for way in ("sent", "received", "total")}


def as_dict(p: Pretrained) -> dict[str, Any]:
    d = asdict(p)
    d["checkpoint"] = str(p.checkpoint)
    return d
