"""Helpers to start real `lowband` processes on loopback and wait on conditions (never on sleeps)."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from protocols.config import RunConfig, to_yaml

LOWBAND = [sys.executable, "-m", "deploy.cli"]
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


def start_coordinator(recipe: Path, tmp: Path, *extra: str) -> tuple[subprocess.Popen[bytes], str]:
    """A `lowband coordinator` process on 127.0.0.1:0; returns it and the address it bound."""
    address_file = tmp / "coordinator.address"
    log = (tmp / "coordinator.log").open("wb")
    proc = subprocess.Popen(
        [*LOWBAND, "coordinator", str(recipe), "--bind", "127.0.0.1:0", "--address-file", str(address_file), *extra],
        stdout=log, stderr=subprocess.STDOUT,
    )
    STARTED.append(proc)
    wait_for(lambda: address_file.exists() or proc.poll() is not None, 60, "the coordinator to bind")
    if proc.poll() is not None:
        raise RuntimeError(f"coordinator exited early:\n{(tmp / 'coordinator.log').read_text()}")
    return proc, address_file.read_text().strip()


def start_worker(address: str, tmp: Path, index: int, *extra: str) -> subprocess.Popen[bytes]:
    log = (tmp / f"worker{index}.log").open("wb")
    proc = subprocess.Popen(
        [*LOWBAND, "worker", "--join", address, "--result-json", str(tmp / f"worker{index}.json"), *extra],
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
