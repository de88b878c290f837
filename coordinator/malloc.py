"""glibc malloc settings for the coordinator's process, which serves from hundreds of threads.

glibc gives threads that contend for the allocator their own arenas, up to 8 per core, and an arena keeps what
its threads freed for them to reuse: a decoded update freed by one gRPC thread is not memory another thread's
next decode can have, so the process's resident set grows with the arenas in use, not with what is live. With
two arenas, bench/coordinator_scale.py's coordinator at 10 workers peaked at 6.3x the model above start-up
instead of 9.5x (BENCHMARKS.md "Coordinator scale"); the coordinator's threads mostly wait on the network and
on its state lock, so they contend for the allocator little.

`MALLOC_ARENA_MAX` in the environment, when set, wins: the operator's choice stands.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger(__name__)

M_ARENA_MAX = -8  # glibc's mallopt parameter (malloc.h)
ARENAS = 2


def limit_arenas(arenas: int = ARENAS) -> bool:
    """Cap this process's malloc arenas (glibc only; arenas created before stay). Whether the cap was set."""
    if "MALLOC_ARENA_MAX" in os.environ:
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to set
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    done = bool(mallopt(M_ARENA_MAX, arenas))
    if not done:
        log.debug("mallopt(M_ARENA_MAX, %d) refused", arenas)
    return done
