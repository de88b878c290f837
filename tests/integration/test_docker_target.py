"""`make docker-test` where Docker cannot build: it says why it skipped and exits 0, building nothing. (Where a
Docker daemon answers, the target builds the image and runs a job in it; that is not run from the suite.)"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MAKE = shutil.which("make")
pytestmark = pytest.mark.skipif(MAKE is None, reason="make is not installed")


def _make_docker_test(path: str) -> subprocess.CompletedProcess[str]:
    assert MAKE is not None
    return subprocess.run([MAKE, "--no-print-directory", "-C", str(ROOT), "docker-test"], env={"PATH": path},
                          capture_output=True, text=True, timeout=120)


def test_without_docker_it_skips_with_a_reason_and_exits_0(tmp_path: Path) -> None:
    done = _make_docker_test(str(tmp_path))  # an empty PATH directory: no docker on it
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "docker-test: skipped, docker is not installed (nothing built)"


def test_without_a_daemon_it_skips_with_a_reason_and_exits_0() -> None:
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("docker is not installed (the test above covers that)")
    if subprocess.run([docker, "info"], capture_output=True, timeout=60).returncode == 0:
        pytest.skip("a Docker daemon answers: the target would build the image")
    done = _make_docker_test(str(Path(docker).parent))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "docker-test: skipped, no Docker daemon answers 'docker info' (nothing built)"
