"""worker.spawn.spawn_on_loopback: ranks forked from one fork server that imported torch, started with the caller's
environment and working directory as they are when the job starts (what a spawned rank got from its parent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from worker.spawn import spawn_on_loopback


def _where(rank: int, world_size: int, init_method: str, key: str) -> dict[str, object]:
    return {"rank": rank, "parent": os.getppid(), "value": os.environ.get(key), "cwd": os.getcwd(),
            "gloo": os.environ.get("GLOO_SOCKET_IFNAME"), "init_method": init_method}


def _fail(rank: int, world_size: int, init_method: str) -> None:
    if rank == 1:
        raise ValueError("rank 1 refuses")


def test_ranks_fork_from_one_server_with_the_callers_environment_and_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = spawn_on_loopback(_where, 2, ("LOWBAND_SPAWN_PROBE",))
    monkeypatch.setenv("LOWBAND_SPAWN_PROBE", "set after the server started")
    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    monkeypatch.chdir(tmp_path)
    second = spawn_on_loopback(_where, 3, ("LOWBAND_SPAWN_PROBE",))
    assert [r["rank"] for r in second] == [0, 1, 2]
    servers = {r["parent"] for r in first + second}
    assert len(servers) == 1 and os.getpid() not in servers  # forked by the same server, not by this process
    assert first[0]["value"] is None
    assert {r["value"] for r in second} == {"set after the server started"}
    assert {r["cwd"] for r in second} == {str(tmp_path)}
    assert {r["gloo"] for r in second} == {"lo"}  # the rendezvous is on 127.0.0.1: gloo is pinned to lo
    assert len({r["init_method"] for r in first + second}) == 2  # a fresh rendezvous per job


def test_a_rank_that_raises_is_named_with_its_traceback() -> None:
    with pytest.raises(RuntimeError, match=r"rank 1 failed:(.|\n)*ValueError: rank 1 refuses"):
        spawn_on_loopback(_fail, 2)
