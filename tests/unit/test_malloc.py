"""coordinator/malloc.py: the arena cap is set on glibc, and an operator's MALLOC_ARENA_MAX is left to stand."""

from __future__ import annotations

import ctypes.util
import platform

import pytest

from coordinator.malloc import limit_arenas

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc" and bool(ctypes.util.find_library("c"))


@pytest.mark.skipif(not GLIBC, reason="mallopt's M_ARENA_MAX is glibc's")
def test_the_arena_cap_is_set_on_glibc(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    assert limit_arenas() is True


def test_an_operators_setting_stands(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert limit_arenas() is False
