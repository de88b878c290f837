"""DDP vs DiLoCo (H in {10, 50}), 4 workers, same token budget, side by side in one invocation.

    python -m bench.diloco_vs_ddp [--workers 4] [--steps 600] [--hs 10,50] [--set key=value ...]

Reports eval loss, bytes per worker (sent, received, total) and the ratios to DDP (of totals); writes
bench/results/diloco_vs_ddp.json and .png. Every contender trains the same model on the same data for the
same number of tokens.
"""

from __future__ import annotations

import argparse

from rich.console import Console

from bench.common import command_line, write_result
from bench.contenders import BYTE_COLUMNS, outer_overrides, plot_curves, run_all, variant
from protocols.config import load_config


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=600, help="inner steps per worker (the token budget)")
    parser.add_argument("--hs", default="10,50", help="comma-separated DiLoCo H values")
    parser.add_argument("--set", action="append", default=[], help="extra config overrides for every contender")
    parser.add_argument("--result-name", default="diloco_vs_ddp",
                        help="name of the result files in bench/results (keeps another run's table)")
    parser.add_argument("--outer-lr", type=float, default=None, help="DiLoCo outer lr (default: the paper's 0.7)")
    parser.add_argument("--outer-momentum", type=float, default=None,
                        help="DiLoCo outer Nesterov momentum (default: the paper's 0.9)")
    args = parser.parse_args(argv)
    base = load_config(None, [f"cluster.workers={args.workers}", f"train.steps={args.steps}", *args.set])
    contenders = [variant(base, "ddp", {"kind": "ddp"})]
    outer = outer_overrides(args.outer_lr, args.outer_momentum)
    contenders += [variant(base, f"diloco-h{h}", {"kind": "diloco", "inner_steps": int(h), **outer})
                   for h in args.hs.split(",")]
    rows, curves = run_all(contenders, Console())
    plot_curves(curves, args.result_name, "DiLoCo vs DDP")
    columns = ["contender", "eval_loss", "loss_vs_ddp", *BYTE_COLUMNS, "bytes_reduction_vs_ddp",
               "tokens", "wall_s", "tokens_per_s"]
    write_result(args.result_name, command_line("bench.diloco_vs_ddp"), rows, columns, baseline="ddp")


if __name__ == "__main__":
    main()
