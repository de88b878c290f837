"""What a process's resident set is made of, read from the kernel and from glibc: thread stacks, malloc's heaps
(the main heap and the per-thread arenas), other anonymous mappings (blocks malloc mapped on their own, torch's
large tensors, gRPC's), and file-backed pages (the interpreter, torch's and gRPC's libraries).

For bench/coordinator_scale.py: which of these grows with the connections is what decides how a server that
serves them would have to change (a thread per open call shows in `thread_stacks`, buffers in the heaps).
Linux only (`/proc/PID/smaps`); glibc only for `malloc_*` (absent elsewhere).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import re
from pathlib import Path
from typing import Any

# pthread's default stack (8 MiB, RLIMIT_STACK) less its guard page, mapped read-write and anonymous per thread.
THREAD_STACK_KB = 8192
ARENA_KB = 65536  # glibc's HEAP_MAX_SIZE on 64-bit: an arena's heap is reserved whole, read-write as it grows
_HEADER = re.compile(r"^[0-9a-f]+-[0-9a-f]+ (\S+) \S+ \S+ \S+(?:\s+(.*))?$")


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _mappings(smaps: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for line in smaps.splitlines():
        header = _HEADER.match(line)
        if header:
            out.append({"perms": header.group(1), "path": (header.group(2) or "").strip(), "size_kb": 0,
                        "rss_kb": 0})
        elif out and line.startswith(("Size:", "Rss:")):
            out[-1]["size_kb" if line.startswith("Size:") else "rss_kb"] = int(line.split()[1])
    return out


def classify(smaps: str) -> dict[str, int]:
    """Resident bytes by kind from the text of /proc/PID/smaps: `thread_stacks` (anonymous read-write
    mappings of a thread stack's size), `malloc_arenas` (an arena heap: read-write then reserved, 64 MiB in
    all), `main_heap` ([heap]), `other_anonymous`, `file_backed`, and `thread_stack_count`."""
    maps = _mappings(smaps)
    kinds = {"thread_stacks": 0, "malloc_arenas": 0, "main_heap": 0, "other_anonymous": 0, "file_backed": 0,
             "thread_stack_count": 0}
    for i, mapping in enumerate(maps):
        rss = mapping["rss_kb"] << 10
        path, writable = mapping["path"], mapping["perms"].startswith("rw")
        after = maps[i + 1] if i + 1 < len(maps) else None
        if path == "[heap]":
            kinds["main_heap"] += rss
        elif path and not path.startswith("["):
            kinds["file_backed"] += rss
        elif path:  # [stack], [vdso], [vvar]: the main thread's stack and the kernel's pages
            kinds["other_anonymous"] += rss
        elif writable and mapping["size_kb"] == THREAD_STACK_KB:
            kinds["thread_stacks"] += rss
            kinds["thread_stack_count"] += 1
        elif (writable and after is not None and not after["path"] and after["perms"].startswith("---")
              and mapping["size_kb"] + after["size_kb"] == ARENA_KB):
            kinds["malloc_arenas"] += rss
        else:
            kinds["other_anonymous"] += rss
    return kinds


def malloc_info() -> dict[str, int]:
    """glibc's own account (mallinfo2): bytes in use in its heaps, free in them (kept, not returned), and in
    blocks mapped on their own. Empty where the C library has no mallinfo2."""
    name = ctypes.util.find_library("c")
    try:
        mallinfo2 = ctypes.CDLL(name).mallinfo2 if name else None
    except (OSError, AttributeError):
        mallinfo2 = None
    if mallinfo2 is None:
        return {}
    mallinfo2.restype = _MallInfo2
    info = mallinfo2()
    return {"malloc_in_use": info.uordblks, "malloc_free_kept": info.fordblks, "malloc_mapped": info.hblkhd}


def proc_status(pid: int | str = "self", keys: tuple[str, ...] = ("VmRSS", "VmHWM")) -> dict[str, int]:
    """Fields of /proc/PID/status: sizes (kB there) in bytes, counts (`Threads`) as they are. By default VmRSS and
    VmHWM (the peak resident set)."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in keys:
            fields = value.split()
            out[key] = int(fields[0]) * (1024 if fields[-1] == "kB" else 1)
    return out


def growth(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """What each kind grew by from `before` to `after` (kinds in both)."""
    return {k: v - before[k] for k, v in after.items() if k in before}


def breakdown(pid: int | str = "self") -> dict[str, int]:
    """This process's (or `pid`'s) resident set by kind, its thread count, and (for this process) glibc's
    account of its heaps."""
    out = classify(Path(f"/proc/{pid}/smaps").read_text()) | {"threads": proc_status(pid, ("Threads",))["Threads"]}
    return out | (malloc_info() if pid == "self" else {})
