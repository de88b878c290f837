"""Render the tables of BENCHMARKS.md from bench/results/*.json, so the doc and the data cannot disagree.

    python -m bench.tables [NAME ...]    # prints markdown sections, one per result file
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from bench.common import RESULTS, format_table


def section(doc: dict[str, Any]) -> str:
    columns: list[str] = []
    for row in doc["rows"]:
        columns += [k for k in row if k not in columns]
    machine = doc["machine"]
    lines = [
        f"### {doc['bench']}",
        "",
        f"`{doc['command']}` — {doc['when']}, {machine['cpus']} CPUs, GPU: {machine['gpu'] or 'none'}, "
        f"torch {machine['torch']}",
        "",
        format_table(doc["rows"], columns),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="result names (default: all in bench/results)")
    args = parser.parse_args(argv)
    names = args.names or sorted(p.stem for p in RESULTS.glob("*.json"))
    for name in names:
        print(section(json.loads((RESULTS / f"{name}.json").read_text())))
        print()


if __name__ == "__main__":
    main()
