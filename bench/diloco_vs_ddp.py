"""DDP vs DiLoCo (H in {10, 50}), 4 workers, same token budget, side by side in one invocation.

    python -m bench.diloco_vs_ddp [--workers 4] [--steps 600]

Reports eval loss, bytes sent per worker and the ratios to DDP; writes bench/results/diloco_vs_ddp.json
and .png. Every contender trains the same model on the same data for the same number of tokens.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from rich.console import Console

from bench.common import RESULTS, command_line, write_result
from deploy.launcher import run
from deploy.report import eval_curve
from protocols.config import RunConfig, load_config


def contenders(base: RunConfig, hs: list[int]) -> list[tuple[str, RunConfig]]:
    data = base.model_dump()
    out = [("ddp", RunConfig.model_validate({**data, "name": "ddp", "protocol": {"kind": "ddp"}}))]
    for h in hs:
        proto = {"kind": "diloco", "inner_steps": h}
        out.append((f"diloco-h{h}", RunConfig.model_validate({**data, "name": f"diloco-h{h}", "protocol": proto})))
    return out


def plot(rows: list[dict[str, Any]], curves: dict[str, list[tuple[float, float]]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, points in curves.items():
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, marker="o", label=name)
    ax.set(xscale="symlog", xlabel="bytes sent per worker", ylabel="eval loss", title="DiLoCo vs DDP")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "diloco_vs_ddp.png", dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=600, help="inner steps per worker (the token budget)")
    parser.add_argument("--hs", default="10,50", help="comma-separated DiLoCo H values")
    parser.add_argument("--set", action="append", default=[], help="extra config overrides for every contender")
    args = parser.parse_args(argv)
    console = Console()
    with tempfile.TemporaryDirectory() as tmp:
        base = load_config(None, [f"cluster.workers={args.workers}", f"train.steps={args.steps}",
                                  f"run_dir={tmp}", *args.set])
        rows, curves = [], {}
        for name, cfg in contenders(base, [int(h) for h in args.hs.split(",")]):
            console.rule(name)
            s = run(cfg, console=console)
            curves[name] = [(b, loss) for _, b, loss in eval_curve(Path(s["run_dir"]), s)]
            rows.append({"contender": name, "eval_loss": s["final_eval_loss"], "tokens": s["tokens"],
                         "bytes_per_worker": s["bytes_up_per_worker"], "wall_s": s["wall_s"],
                         "tokens_per_s": s["tokens"] / s["wall_s"]})
    ddp = rows[0]
    for r in rows:
        r["loss_vs_ddp"] = r["eval_loss"] / ddp["eval_loss"]
        r["bytes_reduction_vs_ddp"] = ddp["bytes_per_worker"] / r["bytes_per_worker"]
    plot(rows, curves)
    columns = ["contender", "eval_loss", "loss_vs_ddp", "bytes_per_worker", "bytes_reduction_vs_ddp", "tokens",
               "wall_s", "tokens_per_s"]
    write_result("diloco_vs_ddp", command_line("bench.diloco_vs_ddp"), rows, columns)


if __name__ == "__main__":
    main()
