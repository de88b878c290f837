"""`lowband certs`: a certificate authority and the certificates of one run, for TLS and mutual TLS.

Writes into OUT_DIR: `ca.pem` / `ca.key` (the run's CA: give `ca.pem` to every worker as `--tls-ca`, and to
the coordinator as `--tls-client-ca` for mutual TLS), `server.pem` / `server.key` (the coordinator's
`--tls-cert` / `--tls-key`, valid for every `--host` name or IP), and with `--client NAME` a client
certificate `NAME.pem` / `NAME.key` (a worker's `--tls-cert` / `--tls-key`). Keys are P-256, written
readable by the owner only. The work is done by the `openssl` command line tool (the `cryptography` package
is not a dependency of lowband; OpenSSL 1.1.1 or newer is on every supported system).
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from protocols.config import ConfigError

DEFAULT_HOSTS = ("localhost", "127.0.0.1")
DEFAULT_DAYS = 365
_KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


class CertError(RuntimeError):
    """openssl failed; the message carries its own error line."""


def subject_alt_names(hosts: list[str]) -> str:
    """`DNS:name` / `IP:address` entries for the server certificate (ConfigError for an empty or odd name)."""
    names = []
    for host in hosts:
        if not host or (any(c in host for c in ",/ :=") and not _is_ip(host)):
            raise ConfigError(f"--host {host!r} is not a host name or an IP address")
        names.append(f"IP:{host}" if _is_ip(host) else f"DNS:{host}")
    return ",".join(names)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _openssl(*args: str) -> None:
    exe = shutil.which("openssl")
    if exe is None:
        raise CertError("`lowband certs` needs the openssl command line tool, which is not on PATH")
    done = subprocess.run([exe, *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise CertError(f"openssl {args[0]} failed: {last}")


def _issue(tmp: Path, ca: tuple[Path, Path], out: tuple[Path, Path], subject: str, extensions: str,
           days: int) -> None:
    csr, ext = tmp / "request.csr", tmp / "extensions.cnf"
    ext.write_text(extensions + "\n")
    _openssl("req", "-new", *_KEY, "-keyout", str(out[1]), "-out", str(csr), "-subj", subject)
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]), "-set_serial",
             str(int.from_bytes(os.urandom(16), "big") >> 1), "-days", str(days), "-out", str(out[0]),
             "-extfile", str(ext))


def make_certs(out_dir: Path, hosts: list[str] | None = None, client: str | None = None,
               days: int = DEFAULT_DAYS) -> list[Path]:
    """Write a CA, a server certificate for `hosts` and, with `client`, a client certificate into
    `out_dir`; returns the files written. Refuses (ConfigError) to overwrite an existing CA."""
    hosts = list(hosts or DEFAULT_HOSTS)
    sans = subject_alt_names(hosts)
    if client is not None and not client.replace("-", "").replace("_", "").isalnum():
        raise ConfigError(f"--client {client!r} must be letters, digits, '-' or '_' (it names the files)")
    if days < 1:
        raise ConfigError(f"--days must be >= 1, got {days}")
    out_dir.mkdir(parents=True, exist_ok=True)
    ca = (out_dir / "ca.pem", out_dir / "ca.key")
    if ca[0].exists() or ca[1].exists():
        raise ConfigError(f"{out_dir} already holds a CA (ca.pem / ca.key): choose another directory")
    server = (out_dir / "server.pem", out_dir / "server.key")
    written = [*ca, *server]
    old_umask = os.umask(0o077)  # keys (and everything else here) readable by the owner only
    try:
        with tempfile.TemporaryDirectory() as tmp:
            _openssl("req", "-x509", *_KEY, "-keyout", str(ca[1]), "-out", str(ca[0]), "-days", str(days),
                     "-subj", "/CN=lowband run CA", "-addext", "basicConstraints=critical,CA:TRUE",
                     "-addext", "keyUsage=critical,keyCertSign,cRLSign")
            _issue(Path(tmp), ca, server, f"/CN={hosts[0]}",
                   f"subjectAltName={sans}\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth", days)
            if client is not None:
                pair = (out_dir / f"{client}.pem", out_dir / f"{client}.key")
                _issue(Path(tmp), ca, pair, f"/CN={client}",
                       "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth", days)
                written += pair
    finally:
        os.umask(old_umask)
    for path in written:
        if path.suffix == ".pem":
            path.chmod(0o644)  # certificates are public
    return written
