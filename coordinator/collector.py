"""Python's cyclic garbage collector in the coordinator's process.

A full collection walks every object the collector tracks. At start-up the coordinator's process already holds
about 200,000 of them (torch, gRPC, numpy, the protocol's modules: none of them ever garbage), and full collections
come more often the more workers there are, so before this a round at 1,000 workers spent ~9 s of its
interpreter in full collections over those start-up objects (bench/coordinator_scale.py with the 0.1M model,
BENCHMARKS.md "Coordinator scale"). `gc.freeze` moves what is alive at start-up out of every later collection;
reference counting still frees those objects, only a cycle among them that becomes garbage later stays.
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
