"""A token is required (issue 12): `lowband coordinator` given none makes a random one and prints it once, a
worker without it is refused in one line, and it never reaches the run directory; a server given no token
refuses to listen anywhere but loopback. Real processes and a real gRPC server."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from coordinator.server import CoordinatorServer
from coordinator.sessions import check_open_bind, is_loopback
from deploy.status import fetch_status
from protocols.config import ConfigError
from tests.conftest import tiny_config
from tests.integration.procs import LOWBAND, STARTED, finish, wait_for, write_recipe

GENERATED = re.compile(r"this run's token is (\S+) \(shown only here\)")


def _coordinator_without_token(recipe: Path, tmp: Path) -> tuple[subprocess.Popen[bytes], str, Path]:
    address_file, log = tmp / "coordinator.address", tmp / "coordinator.log"
    proc = subprocess.Popen([*LOWBAND, "coordinator", str(recipe), "--bind", "127.0.0.1:0", "--address-file",
                             str(address_file)], stdout=log.open("wb"), stderr=subprocess.STDOUT)
    STARTED.append(proc)
    wait_for(lambda: GENERATED.search(log.read_text()) is not None or proc.poll() is not None, 90,
             "the coordinator to print its token")
    assert proc.poll() is None, log.read_text()
    return proc, address_file.read_text().strip(), log


def test_a_coordinator_given_no_token_makes_one_prints_it_once_and_refuses_workers_without_it(tmp_path: Path) -> None:
    cfg = tiny_config(name="tokenless", run_dir=str(tmp_path / "runs"), cluster={"workers": 1})
    recipe = write_recipe(cfg, tmp_path / "tokenless.yaml")
    coord, address, log = _coordinator_without_token(recipe, tmp_path)
    try:
        match = GENERATED.search(log.read_text())
        assert match is not None
        token = match.group(1)
        assert len(token) >= 40 and log.read_text().count(token) == 2  # the line: the token, the worker command
        assert f"lowband worker --join {address} --token {token}" in log.read_text()

        refused = subprocess.run([*LOWBAND, "worker", "--join", address, "--retry-for", "1"], capture_output=True,
                                 text=True, timeout=180)
        lines = refused.stderr.strip().splitlines()
        assert refused.returncode == 1 and len(lines) == 1 and "Traceback" not in refused.stderr, refused.stderr
        assert "no token sent: the coordinator requires one" in lines[0]
        with pytest.raises(Exception, match="UNAUTHENTICATED"):
            fetch_status(address, "")
        status = fetch_status(address, token)  # the printed token is the run's
        assert status.workers == () and status.phase.value == "waiting_for_workers"
    finally:
        coord.terminate()
        finish(coord, 60, log)
    run_files = [p for p in (tmp_path / "runs" / "tokenless").rglob("*") if p.is_file()]
    assert run_files, "the run directory was written"
    for path in run_files:
        assert token.encode() not in path.read_bytes(), f"the token leaked into {path}"


def test_a_server_without_a_token_listens_on_loopback_only(tmp_path: Path) -> None:
    assert is_loopback("127.0.0.1:0") and is_loopback("localhost:7070") and is_loopback("[::1]:0")
    assert not is_loopback("0.0.0.0:7070") and not is_loopback("10.1.2.3:0") and not is_loopback("host.example:1")
    with pytest.raises(ConfigError, match=r"the coordinator has no token and '0\.0\.0\.0:0' is not loopback"):
        CoordinatorServer(tiny_config(run_dir=str(tmp_path / "runs")), bind="0.0.0.0:0")
    check_open_bind("0.0.0.0:0", True, "coordinator")  # with a token, any address
    server = CoordinatorServer(tiny_config(run_dir=str(tmp_path / "runs"), cluster={"token": "t0k3n"}),
                               bind="0.0.0.0:0")
    server.stop(0)
