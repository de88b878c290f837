"""coordinator/malloc.py: both settings are made on glibc, and an operator's environment variable stands."""

from __future__ import annotations

import ctypes.util
import platform

import pytest

from coordinator.malloc import tune_malloc

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
