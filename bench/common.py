"""Shared plumbing for benchmarks: the one JSON shape of DESIGN.md, a printed table, an optional plot.

Every bench script runs its contenders side by side in one invocation and calls `write_result`.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
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


def client_process(module: str, address: str, *args: str) -> subprocess.Popen[str]:
    """A bench's client process, `python -m module --client ADDRESS ARGS`, once it printed "ready" (its set-up
    done); it makes its calls on `go`."""
    client = subprocess.Popen([sys.executable, "-m", module, "--client", address, *args], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert client.stdout is not None
    if client.stdout.readline().strip() != "ready":
        client.kill()
        client.wait()
        raise RuntimeError(f"{module}'s client process failed before its calls")
    return client


def go(client: subprocess.Popen[str]) -> str:
    """Start a `client_process`'s calls and wait for them: its "done ..." line."""
    assert client.stdin is not None and client.stdout is not None
    client.stdin.write("go\n")
    client.stdin.flush()
    done = client.stdout.readline().strip()
    if not done.startswith("done"):
        raise RuntimeError(f"{client.args!r} failed during its calls")
    return done


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
