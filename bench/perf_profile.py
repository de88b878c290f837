"""Where a process's CPU goes, by shared object and by symbol, from Linux `perf` sampling it from outside.

`bench.coordinator_scale --perf` attaches `perf record` to the coordinator once it has started (its start-up is
not the run) and detaches when the run ends. py-spy sees only Python frames and, with `--gil`, only the thread that
holds the interpreter; perf also sees the kernel and the C libraries, which is where a server with a thread per open
call spends its time switching threads (BENCHMARKS.md "Coordinator scale").

Sampling costs the process some speed (perf interrupts it FREQUENCY times a second): a row measured with it is a
profile, not a timing.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

FREQUENCY = 499  # samples per second per CPU the process runs on: not a multiple of the kernel's tick
# perf report's dso names, grouped: what each group is
GROUPS = {
    "kernel": ("[kernel",),
    "python": ("libpython", "python3"),
    "libc": ("libc.so", "libc-", "ld-linux"),
    "torch": ("libtorch", "libc10", "_multiarray", "openblas"),
    "grpc": ("cygrpc", "_message", "libprotobuf"),
}
_ROW = re.compile(r"^\s*(\d+(?:\.\d+)?)%\s+(\d+)\s+(.+?)\s*$")


def available() -> str | None:
    """None when `perf` can sample a process here, else why not."""
    if shutil.which("perf") is None:
        return "Linux perf is not on PATH"
    paranoid = Path("/proc/sys/kernel/perf_event_paranoid")
    if paranoid.exists() and int(paranoid.read_text()) > 1 and os.geteuid() != 0:
        return f"kernel.perf_event_paranoid is {paranoid.read_text().strip()}: run as root or set it to 1"
    return None


def attach(pid: int, data: Path) -> subprocess.Popen[bytes]:
    """Start sampling `pid` (every thread, the kernel's side included) into `data`; `detach` ends it."""
    return subprocess.Popen(["perf", "record", "-F", str(FREQUENCY), "-p", str(pid), "-o", str(data)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def detach(sampler: subprocess.Popen[bytes], timeout: float = 120.0) -> None:
    """Stop sampling and let perf write its file (SIGINT: it finishes the file; past `timeout`, killed)."""
    if sampler.poll() is None:
        sampler.send_signal(signal.SIGINT)
    try:
        sampler.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        sampler.kill()
        sampler.wait()


def parse_report(text: str) -> list[tuple[str, int]]:
    """(name, samples) per row of `perf report --stdio --show-nr-samples`, in its order (most first)."""
    rows = []
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        match = _ROW.match(line)
        if match:
            rows.append((match.group(3), int(match.group(2))))
    return rows


def group_of(dso: str) -> str:
    """The `GROUPS` key a shared object falls in, or "other"."""
    return next((group for group, marks in GROUPS.items() if any(mark in dso for mark in marks)), "other")


def report(data: Path, sort: str) -> list[tuple[str, int]]:
    """`perf report` of `data` sorted by `sort` ("dso" or "sym"), parsed."""
    out = subprocess.run(["perf", "report", "-i", str(data), "--sort", sort, "--stdio", "--show-nr-samples"],
                         capture_output=True, text=True, check=True, timeout=600)
    return parse_report(out.stdout)


def summary(data: Path, top: int = 12) -> dict[str, object]:
    """Samples in all, per `GROUPS` group, and the `top` symbols with their samples."""
    by_dso = report(data, "dso")
    groups: dict[str, int] = {}
    for dso, samples in by_dso:
        group = group_of(dso)
        groups[group] = groups.get(group, 0) + samples
    return {"samples": sum(samples for _, samples in by_dso), "samples_by_group": groups,
            "top_symbols": report(data, "sym")[:top], "frequency_hz": FREQUENCY}
