"""Issue 12: every CLI error listed by the campaign is ONE line on stderr (no traceback), with exit status
2 for a usage or configuration error and 1 for a failure at run time. Real `lowband` processes."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.conftest import tiny_config
from tests.integration.procs import LOWBAND, finish, start_coordinator, write_recipe


def _lowband(*args: str, cwd: Path | None = None) -> tuple[int, str]:
    done = subprocess.run([*LOWBAND, *args], capture_output=True, text=True, timeout=180, cwd=cwd)
    return done.returncode, done.stderr


def _one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


@pytest.mark.parametrize(("args", "text"), [
    (["worker", "--join", "127.0.0.1:99999"], "port 99999 is out of range 1..65535"),
    (["worker", "--join", "localhost"], "must be HOST:PORT (e.g. 127.0.0.1:7070): no port given"),
    (["worker", "--join", "localhost:7070", "--tls-ca", "/no/ca.pem"], "--tls-ca: '/no/ca.pem' is not a file"),
    (["coordinator", "--tls-cert", "/no/cert.pem", "--tls-key", "/no/key.pem"], "'/no/cert.pem' is not a file"),
    (["coordinator", "--bind", "127.0.0.1:70000"], "port 70000 is out of range 0..65535"),
    (["sample", "runs/x", "--tokens", "0"], "--tokens: '0' must be a finite number >= 1"),
    (["sample", "runs/x", "--temperature", "-1"], "--temperature: '-1' must be a finite number > 0"),
    (["sample", "runs/x", "--top-k", "many"], "--top-k: 'many' is not an integer"),
], ids=["join port out of range", "join without port", "missing CA", "missing TLS cert", "bind port out of range",
        "sample tokens", "sample temperature", "sample top-k"])
def test_a_bad_argument_is_one_line_and_status_2(args: list[str], text: str) -> None:
    code, stderr = _lowband(*args)
    assert code == 2
    assert text in _one_line(stderr)


def test_a_recipe_that_is_not_text_is_one_line_and_status_2(tmp_path: Path) -> None:
    recipe = tmp_path / "model.yaml"
    recipe.write_bytes(bytes(range(256)) * 4)
    code, stderr = _lowband("coordinator", str(recipe))
    assert code == 2
    assert f"recipe '{recipe}' is not a text (UTF-8 YAML) file" in _one_line(stderr)


def test_a_tls_file_that_is_not_pem_is_one_line_and_status_2(tmp_path: Path) -> None:
    recipe = write_recipe(tiny_config(cluster={"workers": 1}), tmp_path / "tiny.yaml")
    junk = tmp_path / "cert.pem"
    junk.write_text("not a certificate\n")
    code, stderr = _lowband("coordinator", str(recipe), "--tls-cert", str(junk), "--tls-key", str(junk))
    assert code == 2
    assert f"--tls-cert '{junk}' is not a PEM file" in _one_line(stderr)


def test_a_port_in_use_and_an_address_not_ours_are_one_line_and_status_1(tmp_path: Path) -> None:
    recipe = write_recipe(tiny_config(run_dir=str(tmp_path / "runs"), cluster={"workers": 1}), tmp_path / "tiny.yaml")
    first, address = start_coordinator(recipe, tmp_path)
    try:
        code, stderr = _lowband("coordinator", str(recipe), "--bind", address)
        assert code == 1
        assert f"cannot listen on {address}: the port is in use" in _one_line(stderr)
    finally:
        first.terminate()
        finish(first, 60, tmp_path / "coordinator.log")
    code, stderr = _lowband("coordinator", str(recipe), "--bind", "192.0.2.1:7070")  # TEST-NET-1: never ours
    assert code == 1
    assert "cannot listen on 192.0.2.1:7070" in _one_line(stderr)


def test_a_corrupt_checkpoint_is_one_line_and_status_1(tmp_path: Path) -> None:
    run = tmp_path / "run"
    write_recipe(tiny_config(), run.parent / "recipe.yaml")
    run.mkdir()
    (run / "config.yaml").write_text((run.parent / "recipe.yaml").read_text())
    (run / "checkpoint.pt").write_bytes(b"\x80\x04garbage, not a checkpoint")
    code, stderr = _lowband("sample", str(run))
    assert code == 1
    assert f"the checkpoint ({run}) is corrupt, truncated or not a lowband checkpoint" in _one_line(stderr)


def test_lowband_certs_writes_the_files_and_refuses_to_overwrite_a_ca(tmp_path: Path) -> None:
    out = tmp_path / "certs"
    code, stderr = _lowband("certs", str(out), "--host", "coordinator.example", "--host", "10.0.0.5",
                            "--client", "w0")
    assert code == 0, stderr
    assert sorted(p.name for p in out.iterdir()) == ["ca.key", "ca.pem", "server.key", "server.pem", "w0.key",
                                                     "w0.pem"]
    shown = subprocess.run(["openssl", "x509", "-in", str(out / "server.pem"), "-noout", "-text"],
                           capture_output=True, text=True, check=True).stdout
    assert "DNS:coordinator.example" in shown and "IP Address:10.0.0.5" in shown
    verified = subprocess.run(["openssl", "verify", "-CAfile", str(out / "ca.pem"), str(out / "server.pem"),
                               str(out / "w0.pem")], capture_output=True, text=True)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    code, stderr = _lowband("certs", str(out))
    assert code == 2
    assert "already holds a CA" in _one_line(stderr)
