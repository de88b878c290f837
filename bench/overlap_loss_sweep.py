"""Eval loss of overlapped (CO2) SparseLoCo and DiLoCo variants at bench.overlap's budget, in process.

    python -m bench.overlap_loss_sweep [--only LABEL,...] [--steps 384] [--out overlap_loss_sweep]

A run's eval loss does not depend on the link (BENCHMARKS.md, CO2 section), so the loss side of
bench.overlap's targets can be explored without links or processes: every variant here is
`bench.overlap_runs.run_config(contender, 384, inner_steps=32)` with some protocol fields changed, run
over the in-process transport with `cluster.fold_order: worker` (reproducible bit for bit; the same
losses as the gRPC runs of bench.overlap for the same config). Every variant spells out SparseLoCo's error
feedback decay, so a row does not depend on bench.overlap_runs' default. `vs_diloco_sync` is the eval
loss over diloco-sync's (the first row).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from bench.common import command_line, write_result
from bench.overlap_runs import run_config
from deploy.cli_args import positive_int
from protocols.config import parse_config

COLUMNS = ["label", "contender", "changes", "steps", "eval_loss", "vs_diloco_sync", "seconds"]
STEPS = 384
PAPER, SHORT = {"compression": {"decay": 0.95}}, {"compression": {"decay": 0.8}}
NO_PENALTY = {"overlap": {"penalty": False}}
UPDATE_PROXY = {"overlap": {"eager_proxy": "update"}}

# (label, contender, protocol changes: nested dicts merge into the contender's protocol section)
VARIANTS: list[tuple[str, str, dict[str, Any]]] = [
    ("diloco-sync", "diloco-sync", {}),
    ("diloco-co2", "diloco-co2", {}),
    ("diloco-co2 eager update", "diloco-co2", {"overlap": {"eager": True, "eager_proxy": "update"}}),
    ("sparseloco-sync decay 0.95", "sparseloco-sync", PAPER),
    ("sparseloco-sync decay 0.8", "sparseloco-sync", SHORT),
    ("sparseloco-sync decay 0.5", "sparseloco-sync", {"compression": {"decay": 0.5}}),
    ("sparseloco-co2 decay 0.95", "sparseloco-co2", PAPER),
    ("sparseloco-co2 decay 0.95 lr 0.5", "sparseloco-co2", {**PAPER, "outer_lr": 0.5}),
    ("sparseloco-co2 decay 0.95 no penalty lr 0.5", "sparseloco-co2", {**PAPER, **NO_PENALTY, "outer_lr": 0.5}),
    ("sparseloco-co2 decay 0.8", "sparseloco-co2", SHORT),
    ("sparseloco-co2 decay 0.8 lr 0.7", "sparseloco-co2", {**SHORT, "outer_lr": 0.7}),
    ("sparseloco-co2 decay 0.8 no penalty", "sparseloco-co2", {**SHORT, **NO_PENALTY}),
    ("sparseloco-co2 decay 0.65", "sparseloco-co2", {"compression": {"decay": 0.65}}),
    ("sparseloco-eager share decay 0.95", "sparseloco-eager", {**PAPER, "overlap": {"eager_proxy": "share"}}),
    ("sparseloco-eager share decay 0.8", "sparseloco-eager", {**SHORT, "overlap": {"eager_proxy": "share"}}),
    ("sparseloco-eager update decay 0.8", "sparseloco-eager", {**SHORT, **UPDATE_PROXY}),
    ("sparseloco-eager update decay 0.8 no penalty", "sparseloco-eager",
     {**SHORT, "overlap": {"eager_proxy": "update", "penalty": False}}),
    ("sparseloco-eager update decay 0.65", "sparseloco-eager", {"compression": {"decay": 0.65}, **UPDATE_PROXY}),
    # Denser top-k (the default keeps 1.5% of every chunk): more of the pseudo-gradient goes out each round.
    *[(f"sparseloco-sync decay 0.8 density {d}", "sparseloco-sync", {"compression": {"decay": 0.8, "density": d}})
      for d in (0.03, 0.06)],
    *[(f"sparseloco-co2 decay 0.8 density {d}", "sparseloco-co2", {"compression": {"decay": 0.8, "density": d}})
      for d in (0.03, 0.06, 0.12)],
    *[(f"sparseloco-eager update decay 0.8 density {d}", "sparseloco-eager",
       {"compression": {"decay": 0.8, "density": d}, **UPDATE_PROXY}) for d in (0.03, 0.06, 0.12)],
    ("sparseloco-eager update decay 0.65 density 0.06", "sparseloco-eager",
     {"compression": {"decay": 0.65, "density": 0.06}, **UPDATE_PROXY}),
    # On arrival (protocols/arrival.py): the synchronous step, merged after exactly `delay_steps` of the next
    # round's 32 inner steps (in process the aggregate is there at once; on a link, when it arrives).
    *[(f"diloco-arrival delay {k}", "diloco-arrival", {"overlap": {"delay_steps": k}}) for k in (4, 8, 16)],
    *[(f"sparseloco-arrival decay 0.8 delay {k}", "sparseloco-arrival", {**SHORT, "overlap": {"delay_steps": k}})
      for k in (2, 4, 8, 16, 31)],
    *[(f"sparseloco-arrival decay 0.8 density {d} delay {k}", "sparseloco-arrival",
       {"compression": {"decay": 0.8, "density": d}, "overlap": {"delay_steps": k}})
      for d in (0.03, 0.06) for k in (4, 8)],
]


def config(contender: str, changes: dict[str, Any], steps: int = STEPS) -> Any:
    data = run_config(contender, steps, inner_steps=32).model_dump()
    data["cluster"].update({"transport": "inproc", "fold_order": "worker"})
    data["link"] = None
    for key, value in changes.items():
        section = data["protocol"].get(key)
        data["protocol"][key] = {**section, **value} if isinstance(value, dict) and isinstance(section, dict) else value
    return parse_config(data)


def run(label: str, contender: str, changes: dict[str, Any], steps: int = STEPS) -> dict[str, Any]:
    from deploy.inproc import run_inproc  # deploy imports the whole stack: only when a run is due

    began = time.perf_counter()
    _, results = run_inproc(config(contender, changes, steps))
    losses = [r.final_eval_loss for r in results if r.final_eval_loss is not None]
    return {"label": label, "contender": contender, "changes": changes, "steps": steps, "eval_loss": losses[0],
            "seconds": time.perf_counter() - began}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="", help="comma-separated labels (default: every variant)")
    parser.add_argument("--out", default="overlap_loss_sweep", help="bench/results/<out>.json")
    parser.add_argument("--steps", type=positive_int, default=STEPS,
                        help=f"inner steps per worker (default {STEPS}: bench.overlap's budget, 12 rounds of H=32)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    unknown = only - {v[0] for v in VARIANTS}
    if unknown:
        parser.error(f"--only: no variant {', '.join(sorted(unknown))}")
    rows = [run(*v, steps=args.steps) for v in VARIANTS if not only or v[0] in only]
    base = next((r["eval_loss"] for r in rows if r["label"] == "diloco-sync"), None)
    for row in rows:
        row["vs_diloco_sync"] = row["eval_loss"] / base if base else None
    write_result(args.out, command_line("bench.overlap_loss_sweep"), rows, COLUMNS, threads=1)


if __name__ == "__main__":
    main()
