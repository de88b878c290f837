"""bench.proc_memory: the resident set by kind, on a hand-made smaps text and on this process."""

from __future__ import annotations

import os
import threading

from bench import proc_memory

SMAPS = """\
55d0c0000000-55d0c0100000 r--p 00000000 08:01 123 /usr/bin/python3.11
Size:               1024 kB
Rss:                 900 kB
55d0c1000000-55d0c2000000 rw-p 00000000 00:00 0                          [heap]
Size:              16384 kB
Rss:               12000 kB
7f0000000000-7f0000400000 rw-p 00000000 00:00 0
Size:               4096 kB
Rss:                3000 kB
7f0000400000-7f0004000000 ---p 00000000 00:00 0
Size:              61440 kB
Rss:                   0 kB
7f1000000000-7f1000001000 ---p 00000000 00:00 0
Size:                  4 kB
Rss:                   0 kB
7f1000001000-7f1000801000 rw-p 00000000 00:00 0
Size:               8192 kB
Rss:                  40 kB
7f2000000000-7f2000800000 rw-p 00000000 00:00 0
Size:               8192 kB
Rss:                  24 kB
7f3000000000-7f3000200000 rw-p 00000000 00:00 0
Size:               2048 kB
Rss:                2048 kB
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0                          [stack]
Size:                132 kB
Rss:                  64 kB
"""


def test_each_mapping_counts_once_under_its_kind() -> None:
    kinds = proc_memory.classify(SMAPS)
    assert kinds == {"thread_stacks": (40 + 24) << 10, "thread_stack_count": 2, "malloc_arenas": 3000 << 10,
                     "main_heap": 12000 << 10, "other_anonymous": (2048 + 64) << 10, "file_backed": 900 << 10}


def test_threads_started_show_in_the_count_and_have_stacks() -> None:
    before = proc_memory.breakdown()
    release = threading.Event()
    started = [threading.Thread(target=release.wait) for _ in range(5)]
    for thread in started:
        thread.start()
    try:
        during = proc_memory.breakdown()
    finally:
        release.set()
        for thread in started:
            thread.join()
    assert during["threads"] == before["threads"] + 5
    # Their stacks may be ones glibc kept from threads that ended earlier (already counted before), so the
    # stacks' growth is checked in fresh processes (tests/integration/test_call_memory_bench.py).
    assert during["thread_stack_count"] >= 5 and during["thread_stacks"] > 0
    assert during["malloc_in_use"] > 0


def test_status_sizes_come_in_bytes_and_counts_as_they_are() -> None:
    tasks_before = len(os.listdir("/proc/self/task"))  # the kernel's own list of this process's threads
    status = proc_memory.proc_status("self", ("VmRSS", "VmHWM", "Threads"))
    tasks_after = len(os.listdir("/proc/self/task"))
    assert status["VmHWM"] >= status["VmRSS"] > 1 << 20  # an interpreter is past a MiB
    assert min(tasks_before, tasks_after) <= status["Threads"] <= max(tasks_before, tasks_after)
