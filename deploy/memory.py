"""Allocator settings for lowband's processes: tensor streams reuse memory instead of faulting it in.

Every pushed or pulled chunk is a fresh ~1 MiB buffer. By default glibc serves blocks that size with
mmap and returns them on free, so every chunk's pages are faulted in again; on small VMs that alone
halves gRPC throughput for 256 MB states (see BENCHMARKS.md, transport). With these settings glibc
serves blocks up to 32 MiB from its heap and keeps up to 1 GiB of freed memory, and torch backs large
tensors with transparent huge pages. The cost is that freed memory is returned to the OS later.
"""

from __future__ import annotations

import ctypes
import os

MIB = 1 << 20
# For processes we start (Ray actors, spawned ranks): glibc reads these when the process starts.
ALLOCATOR_ENV = {
    "MALLOC_MMAP_THRESHOLD_": str(32 * MIB),
    "MALLOC_TRIM_THRESHOLD_": str(1 << 30),
    "THP_MEM_ALLOC_ENABLE": "1",
}
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters from glibc's malloc.h


def tune_this_process() -> bool:
    """The same settings for a process already running (the CLI); call before torch allocates.

    Returns False where the C library has no mallopt (not glibc); nothing is changed then but torch's.
    """
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, 32 * MIB)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30))
    except (OSError, AttributeError):
        return False
