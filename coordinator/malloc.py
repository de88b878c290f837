"""glibc malloc settings for the coordinator's process, which serves from hundreds of threads.

Two settings, each measured with bench/coordinator_scale.py's coordinator at 10 workers (peak resident set above
start-up, in model sizes; BENCHMARKS.md "Coordinator scale"):

- Arenas: glibc gives threads that contend for the allocator their own arenas, up to 8 per core, and an arena
  keeps what its threads freed for them to reuse, so a decoded update freed by one gRPC thread is no memory
  another thread's next decode can have: the resident set grows with the arenas in use, not with what is live.
  Two arenas: 9.5x -> 6.2x.
- The mmap threshold: a block at or above it is mapped on its own and unmapped when freed. glibc starts it at
  128 KiB and raises it to the size of any mapped block freed (up to 32 MiB), after which the model's tensors
  (up to a few MB each, several copies during a round's close) come from the arenas' heaps, where what is freed
  between live blocks cannot go back. Fixed at 1 MiB (which also stops the raising): 6.2x -> 4.7x. Fixed at
  128 KiB since: the updates read off the wire (about 315 KB for that model), the 64 KiB batches of chunks gRPC
  buffers and the check's temporaries of a few hundred KB then leave the heaps too. At 300 workers the peak
  above start-up went from 16.3x to 8.7x the model, with rounds as fast (22.2 s and 24.3 s; 64 KiB gave 8.2x,
  23.0 s; bench/results/coordinator_scale_mmap_*_300.json). The blocks it maps are faulted in afresh on first
  use, which is why the check keeps its large temporaries few (protocols/sorting.py, bench/push_cost.py).

malloc_trim after each round was measured too (bench/coordinator_memory.py --trim) and did not lower the peak.
An operator's `MALLOC_ARENA_MAX` / `MALLOC_MMAP_THRESHOLD_` in the environment wins over either.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Callable

# glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
ARENAS = 2
MMAP_THRESHOLD = 128 << 10


def _mallopt() -> Callable[[int, int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to set
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt  # type: ignore[no-any-return]


def tune_malloc(arenas: int = ARENAS, mmap_threshold: int = MMAP_THRESHOLD) -> dict[str, bool]:
    """Cap this process's malloc arenas (arenas created before stay) and fix its mmap threshold, where glibc
    and no environment variable says otherwise. Which of the two were set."""
    mallopt = _mallopt()
    settings = {"MALLOC_ARENA_MAX": (M_ARENA_MAX, arenas), "MALLOC_MMAP_THRESHOLD_": (M_MMAP_THRESHOLD, mmap_threshold)}
    return {env: mallopt is not None and env not in os.environ and bool(mallopt(param, value))
            for env, (param, value) in settings.items()}
