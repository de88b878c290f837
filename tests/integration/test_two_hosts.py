"""Two hosts for real: the coordinator in one network namespace, two workers in another, joined only by a veth
pair (`deploy/shaped_link.py`), found by address, with a token and TLS. Training completes, and the traffic
really crossed the veth: the qdisc on the workers' end counted at least the bytes the workers say they sent.

Needs root, iproute2 and network namespaces; skipped with the reason `shaped_link.support()` gives otherwise.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from deploy.shaped_link import ShapedLink, shaping_problem
from tests.conftest import tiny_config
from tests.integration.procs import LOWBAND, STARTED, finish, wait_for, write_recipe

pytestmark = pytest.mark.skipif(shaping_problem() is not None, reason=str(shaping_problem()))


def _certificate(tmp: Path, ip: str) -> tuple[Path, Path]:
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", f"/CN={ip}", "-addext", f"subjectAltName=IP:{ip}"],
        check=True, capture_output=True,
    )
    return cert, key


def _spawn(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(argv, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    STARTED.append(proc)
    return proc


def test_coordinator_and_workers_in_two_namespaces_train_over_tls_with_a_token(tmp_path: Path) -> None:
    cfg = tiny_config(run_dir=str(tmp_path / "runs"), cluster={"workers": 2})
    recipe = write_recipe(cfg, tmp_path / "tiny.yaml")
    with ShapedLink(rate_mbit=1000) as link:
        cert, key = _certificate(tmp_path, link.addr_a)
        address_file = tmp_path / "coordinator.address"
        coordinator = _spawn(link.exec_argv(link.ns_a, [
            *LOWBAND, "coordinator", str(recipe), "--bind", f"{link.addr_a}:0", "--address-file", str(address_file),
            "--tls-cert", str(cert), "--tls-key", str(key), "--token", "two-hosts-secret"]),
            tmp_path / "coordinator.log")
        wait_for(lambda: address_file.exists() or coordinator.poll() is not None, 60, "the coordinator to bind")
        assert coordinator.poll() is None, (tmp_path / "coordinator.log").read_text()
        address = address_file.read_text().strip()
        assert address.startswith(link.addr_a + ":")

        workers = [_spawn(link.exec_argv(link.ns_b, [
            *LOWBAND, "worker", "--join", address, "--token", "two-hosts-secret", "--tls-ca", str(cert),
            "--name", f"remote{i}", "--result-json", str(tmp_path / f"worker{i}.json")]),
            tmp_path / f"worker{i}.log") for i in range(2)]
        for i, worker in enumerate(workers):
            assert finish(worker, 240, tmp_path / f"worker{i}.log") == 0, (tmp_path / f"worker{i}.log").read_text()
        assert finish(coordinator, 120, tmp_path / "coordinator.log") == 0
        crossed = link.egress_bytes(link.ns_b)

    results = [json.loads((tmp_path / f"worker{i}.json").read_text()) for i in range(2)]
    assert [r["rounds"] for r in results] == [cfg.rounds, cfg.rounds]
    summary = json.loads((Path(cfg.run_dir) / cfg.name / "summary.json").read_text())
    assert set(summary["workers"]) == {"remote0", "remote1"}
    assert summary["final_eval_loss"] is not None
    # What left the workers' namespace went through the veth (frames: more than the payload bytes counted).
    assert crossed >= sum(r["bytes_sent"] for r in results) > 0
