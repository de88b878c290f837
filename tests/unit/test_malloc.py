"""coordinator/malloc.py: both settings are made on glibc, an operator's environment variable stands, and a process
started with `coordinator_env` has glibc's per-thread cache off."""

from __future__ import annotations

import ctypes.util
import os
import platform
import subprocess
import sys

import pytest

from coordinator.malloc import ENV_NAMES, TCACHE_OFF, allocator_settings, coordinator_env, tune_malloc

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc" and bool(ctypes.util.find_library("c"))


@pytest.mark.skipif(not GLIBC, reason="mallopt's M_ARENA_MAX and M_MMAP_THRESHOLD are glibc's")
def test_both_settings_are_made_on_glibc(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    assert tune_malloc() == {"MALLOC_ARENA_MAX": True, "MALLOC_MMAP_THRESHOLD_": True}


def test_an_operators_setting_stands(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert tune_malloc() == {"MALLOC_ARENA_MAX": False, "MALLOC_MMAP_THRESHOLD_": False}


def test_a_coordinator_starts_with_every_setting_and_the_cache_off() -> None:
    assert coordinator_env({}) == {"MALLOC_ARENA_MAX": "2", "MALLOC_MMAP_THRESHOLD_": str(128 << 10),
                                   "MALLOC_TRIM_THRESHOLD_": str(128 << 10), "GLIBC_TUNABLES": TCACHE_OFF}


def test_the_cache_setting_joins_an_operators_tunables_and_their_values_stand() -> None:
    env = coordinator_env({"MALLOC_ARENA_MAX": "8", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"})
    assert "MALLOC_ARENA_MAX" not in env
    assert env["GLIBC_TUNABLES"] == f"glibc.malloc.hugetlb=1:{TCACHE_OFF}"
    assert "GLIBC_TUNABLES" not in coordinator_env({"GLIBC_TUNABLES": "glibc.malloc.tcache_count=3"})
    assert coordinator_env({**coordinator_env({}), "GLIBC_TUNABLES": TCACHE_OFF}) == {}  # started with it: nothing


# malloc(1000) then free: with the per-thread cache the block stays in it, counted in use (uordblks unchanged);
# without it the block goes back to the arena (uordblks falls by its size). The least change over a few tries, so a
# stray allocation between the calls cannot fake either.
_FREED_BLOCK = """
import ctypes
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes, libc.mallinfo2.restype = [ctypes.c_void_p], Info
drops = []
for _ in range(5):
    block = libc.malloc(1000)
    before = libc.mallinfo2().uordblks
    libc.free(block)
    drops.append(before - libc.mallinfo2().uordblks)
print(min(drops))
"""


def _freed_bytes_returned(env: dict[str, str]) -> int:
    clean = {k: v for k, v in os.environ.items() if k not in ENV_NAMES}
    out = subprocess.run([sys.executable, "-c", _FREED_BLOCK], env={**clean, **env}, capture_output=True, text=True,
                         check=True)
    return int(out.stdout)


@pytest.mark.skipif(not GLIBC, reason="GLIBC_TUNABLES and mallinfo2 are glibc's")
def test_glibc_takes_the_cache_off_in_a_process_started_with_the_coordinators_environment() -> None:
    assert _freed_bytes_returned({}) == 0  # glibc as it comes: the freed block stays in the thread's cache
    assert _freed_bytes_returned(coordinator_env({})) >= 1000


def test_the_allocator_settings_logged_are_the_environments() -> None:
    env = {"MALLOC_ARENA_MAX": "2", "GLIBC_TUNABLES": TCACHE_OFF, "PATH": "/bin"}
    assert allocator_settings(env) == {"MALLOC_ARENA_MAX": "2", "GLIBC_TUNABLES": TCACHE_OFF}
