"""Bytes on the wire, both ways, vs model quality: DDP, DiLoCo, DiLoCo+int8, SparseLoCo and EControl-DDP.

    python -m bench.wire_bytes [--workers 4] [--steps 600] [--h 30] [--sparseloco-density 0.015625]
                               [--outer-lr LR] [--outer-momentum M] [--set key=value ...]

All contenders: same model, data and token budget (`--steps` inner steps per worker), 4 workers, the gRPC
star for the coordinated protocols. Bytes are what each worker sent and received (serialized messages: the
update up, the round's aggregate down, the initial state, heartbeats and long-polls); DDP's are the ring
all-reduce volume. `bytes_reduction_vs_ddp` compares totals. Contenders:

- ddp; diloco-h{H} (dense both ways);
- diloco-h{H}-int8: int8 pseudo-gradients up, the aggregate down as int8 under the coordinator's EF14;
- sparseloco-h{H}: `--sparseloco-density` (default the paper's 64/4096), its sparse downlink (the senders'
  payloads relayed, or the union of their coordinates, whichever is smaller);
- sparseloco-h{H}-d64: the paper's density 64/4096 when `--sparseloco-density` is another;
- econtrol-ddp: every step's update, top-10% under EControl feedback, dense aggregate down (the paper's).

Writes bench/results/wire_bytes.json and .png.
"""

from __future__ import annotations

import argparse

from rich.console import Console

from bench.common import command_line, write_result
from bench.contenders import BYTE_COLUMNS, outer_overrides, plot_curves, run_all, variant
from protocols.config import load_config

PAPER_DENSITY = 64 / 4096


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=600, help="inner steps per worker (the token budget)")
    parser.add_argument("--h", type=int, default=30, help="inner steps per round for DiLoCo and SparseLoCo")
    parser.add_argument("--set", action="append", default=[], help="extra config overrides for every contender")
    parser.add_argument("--outer-lr", type=float, default=None, help="DiLoCo outer lr (default: the paper's 0.7)")
    parser.add_argument("--outer-momentum", type=float, default=None,
                        help="DiLoCo outer Nesterov momentum (default: the paper's 0.9)")
    parser.add_argument("--sparseloco-density", type=float, default=PAPER_DENSITY,
                        help="fraction of each 4096-entry chunk SparseLoCo sends (default: the paper's 64/4096)")
    args = parser.parse_args(argv)
    if not 0 < args.sparseloco_density <= 1:
        parser.error(f"--sparseloco-density must be in (0, 1], got {args.sparseloco_density}")
    base = load_config(None, [f"cluster.workers={args.workers}", f"train.steps={args.steps}", *args.set])
    h = args.h
    outer = outer_overrides(args.outer_lr, args.outer_momentum)

    def sparseloco(density: float) -> dict[str, object]:
        return {"kind": "sparseloco", "inner_steps": h, "compression": {"codec": "sparseloco", "density": density}}

    contenders = [
        variant(base, "ddp", {"kind": "ddp"}),
        variant(base, f"diloco-h{h}", {"kind": "diloco", "inner_steps": h, **outer}),
        variant(base, f"diloco-h{h}-int8", {"kind": "diloco", "inner_steps": h, "compression": {"codec": "int8"},
                                            "downlink": {"codec": "int8", "error_feedback": "ef14"}, **outer}),
        variant(base, f"sparseloco-h{h}", sparseloco(args.sparseloco_density)),
    ]
    if args.sparseloco_density != PAPER_DENSITY:
        contenders.append(variant(base, f"sparseloco-h{h}-d64", sparseloco(PAPER_DENSITY)))
    contenders.append(variant(base, "econtrol-ddp", {"kind": "econtrol", "inner_steps": 1}))
    rows, curves = run_all(contenders, Console())
    plot_curves(curves, "wire_bytes", "eval loss vs bytes on the wire (both ways)")
    columns = ["contender", "eval_loss", "loss_vs_ddp", *BYTE_COLUMNS, "bytes_reduction_vs_ddp", "tokens", "wall_s"]
    write_result("wire_bytes", command_line("bench.wire_bytes"), rows, columns, baseline="ddp")


if __name__ == "__main__":
    main()
