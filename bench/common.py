"""Shared plumbing for benchmarks: the one JSON shape of DESIGN.md, a printed table, an optional plot.

Every bench script runs its contenders side by side in one invocation and calls `write_result`.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import torch

RESULTS = Path(__file__).resolve().parent / "results"

T = TypeVar("T", int, float, str)


def comma_list(text: str, kind: Callable[[str], T], valid: Callable[[list[T]], bool], example: str) -> list[T]:
    """A command-line list such as "8,32,128": its values, or an argparse error naming what was expected."""
    import argparse

    try:
        values = [kind(s) for s in text.split(",") if s.strip()]
    except ValueError:
        values = []
    if not values or not valid(values):
        raise argparse.ArgumentTypeError(f"expected {example}, got {text!r}")
    return values


def machine() -> dict[str, Any]:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpus": os.cpu_count(),
        "gpu": gpu,
        "torch": torch.__version__.split("+")[0],
        "python": platform.python_version(),
    }


def command_line(module: str) -> str:
    return " ".join(["python -m", module, *sys.argv[1:]])


def format_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A GitHub-markdown table of `columns` (missing cells left blank)."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_result(
    bench: str, command: str, rows: list[dict[str, Any]], columns: list[str], **extra: Any
) -> Path:
    """Print the table and write bench/results/<bench>.json."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    doc = {
        "bench": bench,
        "command": command,
        "when": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": machine(),
        "rows": rows,
        **extra,
    }
    path = RESULTS / f"{bench}.json"
    path.write_text(json.dumps(doc, indent=2) + "\n")
    print(format_table(rows, columns))
    print(f"\nwrote {path}")
    return path
