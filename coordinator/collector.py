"""Python's cyclic garbage collector in the coordinator's process.

A full collection walks every object the collector tracks. At start-up the coordinator's process already holds
about 200,000 of them (torch, gRPC, numpy, the protocol's modules: none of them ever garbage), and full collections
come more often the more workers there are. `gc.freeze` moves what is alive at start-up out of every later
collection; reference counting still frees those objects, only a cycle among them that becomes garbage later stays.
At 1,000 workers (bench/coordinator_scale.py, the 0.1M model, 3 rounds, two runs each side; BENCHMARKS.md
"Coordinator scale") the run's 18 full collections took 8.8 and 9.7 s before, 3.7 and 4.6 s with it.
"""

from __future__ import annotations

import gc
import threading

_frozen = threading.Event()


def freeze_startup() -> bool:
    """Once per process (a second server in the same process, as in the tests, freezes nothing more): True when
    this call froze the objects alive now."""
    if _frozen.is_set():
        return False
    _frozen.set()
    gc.collect()  # what is garbage already goes now, not into the permanent generation
    gc.freeze()
    return True
