"""Helpers to start real `lowband` processes on loopback and wait on conditions (never on sleeps)."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from protocols.config import RunConfig, to_yaml

LOWBAND = [sys.executable, "-m", "deploy.cli"]
# The run token of a coordinator a test starts without one of its own (a token is required).
PROC_TOKEN = "procs-run-token"
# Every process a test starts, so the autouse fixture in conftest.py can kill what a failed test left.
STARTED: list[subprocess.Popen[bytes]] = []


def kill_leftovers() -> None:
    while STARTED:
        proc = STARTED.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


def write_recipe(cfg: RunConfig, path: Path) -> Path:
    path.write_text(to_yaml(cfg))
    return path


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def _given_token(recipe: Path, extra: tuple[str, ...]) -> bool:
    """Whether a coordinator started with `recipe` and `extra` has a token of the test's own."""
    cluster = (yaml.safe_load(recipe.read_text()) or {}).get("cluster") or {}
    return bool(cluster.get("token")) or bool({"--token", "--token-file", "--worker-tokens"} & set(extra))


def start_coordinator(recipe: Path, tmp: Path, *extra: str) -> tuple[subprocess.Popen[bytes], str]:
    """A `lowband coordinator` process on 127.0.0.1:0; returns it and the address it bound. A token is
    required: one the test gives none gets PROC_TOKEN, which `start_worker` sends unless told another."""
    address_file = tmp / "coordinator.address"
    log = (tmp / "coordinator.log").open("wb")
    token = () if _given_token(recipe, extra) else ("--token", PROC_TOKEN)
    proc = subprocess.Popen(
        [*LOWBAND, "coordinator", str(recipe), "--bind", "127.0.0.1:0", "--address-file", str(address_file),
         *token, *extra],
        stdout=log, stderr=subprocess.STDOUT,
    )
    STARTED.append(proc)
    wait_for(lambda: address_file.exists() or proc.poll() is not None, 60, "the coordinator to bind")
    if proc.poll() is not None:
        raise RuntimeError(f"coordinator exited early:\n{(tmp / 'coordinator.log').read_text()}")
    return proc, address_file.read_text().strip()


def start_worker(address: str, tmp: Path, index: int, *extra: str) -> subprocess.Popen[bytes]:
    """A `lowband worker` process joining `address`, with PROC_TOKEN unless `extra` gives a token."""
    log = (tmp / f"worker{index}.log").open("wb")
    token = () if {"--token", "--token-file"} & set(extra) else ("--token", PROC_TOKEN)
    proc = subprocess.Popen(
        [*LOWBAND, "worker", "--join", address, "--result-json", str(tmp / f"worker{index}.json"), *token, *extra],
        stdout=log, stderr=subprocess.STDOUT,
    )
    STARTED.append(proc)
    return proc


def finish(proc: subprocess.Popen[bytes], timeout: float, log: Path) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"process did not finish in {timeout}s; log:\n{log.read_text()[-3000:]}") from None
