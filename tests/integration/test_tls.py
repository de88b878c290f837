"""TLS between `lowband coordinator` and `lowband worker`: real processes, a self-signed certificate."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.conftest import tiny_config
from tests.integration.procs import LOWBAND, finish, start_coordinator, start_worker, write_recipe


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        check=True, capture_output=True,
    )
    return cert, key


def test_worker_trains_over_tls_and_a_plaintext_worker_gets_one_clear_error(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    cfg = tiny_config(run_dir=str(tmp_path / "runs"), cluster={"workers": 1})
    coord, address = start_coordinator(write_recipe(cfg, tmp_path / "tiny.yaml"), tmp_path,
                                       "--tls-cert", str(cert), "--tls-key", str(key), "--token", "s3")

    plain = subprocess.run([*LOWBAND, "worker", "--join", address, "--token", "s3", "--retry-for", "1"],
                           capture_output=True, text=True, timeout=120)
    assert plain.returncode == 1
    assert "error: coordinator said UNAVAILABLE" in plain.stderr and "Traceback" not in plain.stderr

    worker = start_worker(address, tmp_path, 0, "--tls-ca", str(cert), "--token", "s3")
    assert finish(worker, 180, tmp_path / "worker0.log") == 0, (tmp_path / "worker0.log").read_text()
    assert finish(coord, 180, tmp_path / "coordinator.log") == 0
    assert json.loads((tmp_path / "worker0.json").read_text())["rounds"] == 2
