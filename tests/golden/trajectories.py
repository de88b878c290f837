"""Golden loss trajectories: a few rounds of DiLoCo, SparseLoCo and EControl on a tiny config.

Recorded before the round loop moved behind the transport seam (issue 7), so the refactor can show it kept
the math: `python -m tests.golden.trajectories --write` records `trajectories.json`; the unit test
`tests/unit/test_golden.py` recomputes the trajectories and compares. Two workers train in turn in one
process (one torch thread, fixed seeds) and their updates are folded in worker-index order.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from protocols.config import RunConfig
from tests.conftest import tiny_config

GOLDEN = Path(__file__).resolve().parent / "trajectories.json"
ROUNDS = 4
WORKERS = 2
CASES: dict[str, dict[str, Any]] = {
    "diloco": {"kind": "diloco", "inner_steps": 3, "outer_lr": 1.0, "outer_momentum": 0.5},
    "sparseloco": {"kind": "sparseloco", "inner_steps": 3, "compression": {"density": 0.0625, "chunk": 256}},
    "econtrol": {"kind": "econtrol", "inner_steps": 1, "compression": {"eta": 0.1, "density": 0.1, "chunk": 256}},
}


def case_config(case: str) -> RunConfig:
    protocol = CASES[case]
    return tiny_config(
        protocol=protocol,
        train={"steps": ROUNDS * protocol["inner_steps"], "lr": 1e-2, "warmup_steps": 1, "eval_batches": 2},
        cluster={"workers": WORKERS},
    )


def machine() -> dict[str, str]:
    """What bit-identity depends on: the torch build and the CPU kernels it picks."""
    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def record(compute: Any) -> dict[str, Any]:
    return {"machine": machine(), "rounds": ROUNDS, "cases": {case: compute(case) for case in CASES}}


def main() -> None:
    from tests.golden.compute import trajectory

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--write", action="store_true", help=f"record {GOLDEN.name} (else print)")
    args = parser.parse_args()
    doc = record(trajectory)
    text = json.dumps(doc, indent=2) + "\n"
    if args.write:
        GOLDEN.write_text(text)
        print(f"wrote {GOLDEN}")
    else:
        print(text)


if __name__ == "__main__":
    main()
