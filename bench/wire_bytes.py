"""Bytes on the wire vs model quality: DDP, DiLoCo, DiLoCo+int8, SparseLoCo and EControl-DDP, side by side.

    python -m bench.wire_bytes [--workers 4] [--steps 600] [--h 30] [--sparseloco-density 0.015625]
                               [--outer-lr LR] [--outer-momentum M] [--set key=value ...]

All contenders: same model, data and token budget (`--steps` inner steps per worker), 4 workers, the gRPC
star for the coordinated protocols. Bytes are what each worker sent (serialized messages); the table also
shows what it received, since a star worker pulls the dense global state every round. Writes
bench/results/wire_bytes.json and .png.
"""

from __future__ import annotations

import argparse

from rich.console import Console

from bench.common import command_line, write_result
from bench.contenders import outer_overrides, plot_curves, run_all, variant
from protocols.config import load_config


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=600, help="inner steps per worker (the token budget)")
    parser.add_argument("--h", type=int, default=30, help="inner steps per round for DiLoCo and SparseLoCo")
    parser.add_argument("--set", action="append", default=[], help="extra config overrides for every contender")
    parser.add_argument("--outer-lr", type=float, default=None, help="DiLoCo outer lr (default: the paper's 0.7)")
    parser.add_argument("--outer-momentum", type=float, default=None,
                        help="DiLoCo outer Nesterov momentum (default: the paper's 0.9)")
    parser.add_argument("--sparseloco-density", type=float, default=None,
                        help="fraction of each 4096-entry chunk SparseLoCo sends (default: the paper's 64/4096)")
    args = parser.parse_args(argv)
    if args.sparseloco_density is not None and not 0 < args.sparseloco_density <= 1:
        parser.error(f"--sparseloco-density must be in (0, 1], got {args.sparseloco_density}")
    base = load_config(None, [f"cluster.workers={args.workers}", f"train.steps={args.steps}", *args.set])
    h = args.h
    outer = outer_overrides(args.outer_lr, args.outer_momentum)
    sparse = {} if args.sparseloco_density is None else {
        "compression": {"codec": "sparseloco", "density": args.sparseloco_density}}
    contenders = [
        variant(base, "ddp", {"kind": "ddp"}),
        variant(base, f"diloco-h{h}", {"kind": "diloco", "inner_steps": h, **outer}),
        variant(base, f"diloco-h{h}-int8",
                {"kind": "diloco", "inner_steps": h, "compression": {"codec": "int8"}, **outer}),
        variant(base, f"sparseloco-h{h}", {"kind": "sparseloco", "inner_steps": h, **sparse}),
        variant(base, "econtrol-ddp", {"kind": "econtrol", "inner_steps": 1}),
    ]
    rows, curves = run_all(contenders, Console())
    plot_curves(curves, "wire_bytes", "eval loss vs bytes sent")
    columns = ["contender", "eval_loss", "loss_vs_ddp", "bytes_per_worker", "bytes_reduction_vs_ddp",
               "bytes_down_per_worker", "tokens", "wall_s"]
    write_result("wire_bytes", command_line("bench.wire_bytes"), rows, columns, baseline="ddp")


if __name__ == "__main__":
    main()
