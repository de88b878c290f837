"""Throughput of the SparseLoCo codec against the memory-bandwidth ceiling and a plain torch.topk.

    python -m bench.compression [--sizes 16m,128m] [--repeat N]

For each size n (fp32 elements, standard normal), side by side in one process:
- clone-<n>:                 x.clone(), the memory-bandwidth ceiling;
- torch-topk-<n>:            torch.topk(|x|, k) over the whole flat tensor, k = what sparseloco keeps;
- sparseloco-compress-<n>:   chunked top-k (61 of every 4096) + 2-bit quantize + bit packing;
- sparseloco-decompress-<n>: validate + unpack + decode into a dense tensor.
Each row: gb_per_s = input fp32 bytes / seconds (median of --repeat timed runs after one warm-up)
and ratio_to_clone = gb_per_s / the clone rate of the same size.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from bench.common import command_line, write_result
from compression.sparseloco import SparseLoCo

COLUMNS = ["contender", "elements", "gb_per_s", "seconds", "ratio_to_clone", "wire_bytes"]


def parse_size(text: str) -> int:
    """'16m' -> 16 * 2**20, '4k' -> 4096, '1000' -> 1000."""
    text = text.strip().lower()
    scale = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}.get(text[-1:], 1)
    digits = text[:-1] if scale > 1 else text
    if not digits.isdigit() or int(digits) < 1:
        raise argparse.ArgumentTypeError(f"size {text!r} is not a positive count like 16m or 4096")
    return int(digits) * scale


def median_seconds(fn: Callable[[], Any], repeat: int) -> float:
    fn()  # warm-up: first-touch page faults and allocator growth are not what we measure
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_size(n: int, label: str, repeat: int) -> list[dict[str, Any]]:
    x = torch.randn(n, generator=torch.Generator().manual_seed(0))
    codec = SparseLoCo()
    payload = codec.compress(x)
    kept = (n // codec.chunk) * int(payload.meta["k"]) + int(payload.meta["k_last"])
    contenders: list[tuple[str, Callable[[], Any], int | None]] = [
        (f"clone-{label}", x.clone, None),
        (f"torch-topk-{label}", lambda: torch.topk(x.abs(), kept, sorted=False), None),
        (f"sparseloco-compress-{label}", lambda: codec.compress(x), payload.nbytes()),
        (f"sparseloco-decompress-{label}", lambda: codec.decompress(payload), None),
    ]
    rows: list[dict[str, Any]] = []
    for name, fn, wire in contenders:
        seconds = median_seconds(fn, repeat)
        rows.append({"contender": name, "elements": n, "gb_per_s": 4 * n / seconds / 1e9, "seconds": seconds})
        if wire is not None:
            rows[-1]["wire_bytes"] = wire
    clone_rate = rows[0]["gb_per_s"]
    for row in rows:
        row["ratio_to_clone"] = row["gb_per_s"] / clone_rate
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="16m,128m", help="comma-separated element counts (k/m/g suffixes)")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per contender (median reported)")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be >= 1")
    labels = [s.strip().lower() for s in args.sizes.split(",") if s.strip()]
    sizes = [(parse_size(label), label) for label in labels]
    rows = [row for n, label in sizes for row in bench_size(n, label, args.repeat)]
    write_result(
        "compression",
        command_line("bench.compression"),
        rows,
        COLUMNS,
        threads=torch.get_num_threads(),
    )


if __name__ == "__main__":
    main()
