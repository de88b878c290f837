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

A third setting can only be made as a process starts, so `coordinator_env` names it, with the two above, for the
launchers that start a coordinator process (the Ray actor, `lowband coordinator`, which starts itself again with it):

- The per-thread cache off (`GLIBC_TUNABLES=glibc.malloc.tcache_count=0`): glibc keeps up to 7 freed blocks of each
  small size (up to ~1 KiB) in the thread that freed them, for that thread alone, and counts them in use. A thread
  serving a long poll sat on its cache for as long as the call lasted, and the synchronous gRPC server the
  coordinator ran until 2026-12-02 kept a thread per call open at once, about one per worker (the asyncio server
  since keeps about a hundred threads at any size; the setting stays for them). At 1,000 workers
  (bench/coordinator_scale.py, the 0.1M model, so what is left is per connection) the growth above start-up fell
  from 130 MB to 108 MB, malloc's bytes in use from 29 MB to 8 MB, with rounds as fast; with the 10.75M model, from
  8.68x to 7.93x the model (BENCHMARKS.md "Coordinator scale").
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Callable, Mapping

# glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
ARENAS = 2
MMAP_THRESHOLD = 128 << 10
TCACHE_OFF = "glibc.malloc.tcache_count=0"
# The trim threshold at glibc's own default (128 KiB) instead of the 1 GiB deploy/memory.py gives the processes that
# stream tensors: a coordinator started inside a Ray job would otherwise inherit the job's, and keep up to 1 GiB of
# freed heap.
TRIM_THRESHOLD = 128 << 10
# What a coordinator process starts with (`coordinator_env`), besides the per-thread cache in GLIBC_TUNABLES.
VARIABLES = {"MALLOC_ARENA_MAX": str(ARENAS), "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD),
             "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD)}
ENV_NAMES = (*VARIABLES, "GLIBC_TUNABLES")


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


def coordinator_env(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The variables a coordinator process should start with that `environ` does not set already: the arenas and
    mmap threshold `tune_malloc` sets (as variables they also reach a process that never calls it), glibc's trim
    threshold, and the per-thread cache off, added to any other `GLIBC_TUNABLES` given. An operator's own value
    of any of them stands (a `GLIBC_TUNABLES` that sets `tcache_count` included). Empty: nothing to add."""
    env = {name: value for name, value in VARIABLES.items() if name not in environ}
    tunables = environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.tcache_count=" not in tunables:
        env["GLIBC_TUNABLES"] = f"{tunables}:{TCACHE_OFF}" if tunables else TCACHE_OFF
    return env


def allocator_settings(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """This process's allocator variables as it started (`coordinator_env`'s names), for its run directory's log."""
    return {name: environ[name] for name in ENV_NAMES if name in environ}
