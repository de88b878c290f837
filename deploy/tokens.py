"""Per-worker tokens (issue 12, security): a file of lines `NAME TOKEN`, one per worker.

`lowband tokens --workers N --out FILE` writes one (names w0..w{N-1}, the ids the coordinator would give, each
token 32 random bytes, the file created with mode 0600 and never overwritten). `lowband coordinator
--worker-tokens FILE` then admits each named worker only with its own token and only under its own name; the
run's `--token`, if also given, admits no join any more (it only opens `lowband status`: see
coordinator/sessions.py for the whole rule). `lowband worker --name NAME --token-file FILE` reads its own line
(a file holding a single bare token works too, for a worker handed only its own). The coordinator keeps the
tokens' digests only, and neither the run directory nor the config sent to workers ever holds one.
"""

from __future__ import annotations

import os
import re
import secrets
import stat
from pathlib import Path

from protocols.config import ConfigError

# A worker name: what `--name` may be and what the coordinator's ids look like.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
# Bytes of randomness in a token `lowband tokens` makes; a file's token must have at least MIN_TOKEN characters.
TOKEN_BYTES = 32
MIN_TOKEN = 16


def make_worker_tokens(workers: int, prefix: str = "w") -> dict[str, str]:
    """Names `{prefix}0..` -> a fresh random token each."""
    if not NAME.fullmatch(f"{prefix}{max(workers - 1, 0)}"):
        raise ConfigError(f"--prefix {prefix[:64]!r} does not make worker names (letters, digits, '_', '.', '-'; "
                          f"a letter or digit first; at most 64 in all)")
    return {f"{prefix}{k}": secrets.token_urlsafe(TOKEN_BYTES) for k in range(workers)}


def write_worker_tokens(path: Path, tokens: dict[str, str]) -> Path:
    """Create `path` (mode 0600; ConfigError if it exists) with one `NAME TOKEN` line per worker."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ConfigError(f"{path} exists: a token file is never overwritten (remove it, or give another --out)") \
            from None
    except OSError as err:
        raise ConfigError(f"cannot create {path}: {err.strerror or err}") from None
    with os.fdopen(fd, "w") as f:
        f.write("".join(f"{name} {token}\n" for name, token in tokens.items()))
    return path


def _lines(path: Path, flag: str) -> list[list[str]]:
    """The file's non-blank, non-comment lines, split on whitespace; ConfigError (one line) if it cannot be
    read or others may read it."""
    try:
        mode = path.stat().st_mode
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{flag} {path}: cannot be read as text ({getattr(err, 'strerror', None) or err})") \
            from None
    if stat.S_IMODE(mode) & 0o077:
        raise ConfigError(f"{flag} {path}: others may read it (mode {stat.S_IMODE(mode):04o}); a token file must be "
                          f"the owner's only: chmod 600 {path}")
    return [line.split() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def read_worker_tokens(path: Path) -> dict[str, str]:
    """The file's name -> token; ConfigError naming the line (never a token) for anything malformed."""
    tokens: dict[str, str] = {}
    seen: set[str] = set()
    for number, fields in enumerate(_lines(path, "--worker-tokens"), 1):
        where = f"--worker-tokens {path}, entry {number}"
        if len(fields) != 2:
            raise ConfigError(f"{where}: expected `NAME TOKEN`, got {len(fields)} field(s)")
        name, token = fields
        if not NAME.fullmatch(name):
            raise ConfigError(f"{where}: {name[:64]!r} is not a worker name (letters, digits, '_', '.', '-'; "
                              f"at most 64)")
        if len(token) < MIN_TOKEN:
            raise ConfigError(f"{where}: worker {name}'s token is shorter than {MIN_TOKEN} characters "
                              f"(`lowband tokens` makes strong ones)")
        if name in tokens:
            raise ConfigError(f"{where}: worker {name} is listed twice")
        if token in seen:
            raise ConfigError(f"{where}: worker {name}'s token is also another worker's: each needs its own")
        tokens[name] = token
        seen.add(token)
    if not tokens:
        raise ConfigError(f"--worker-tokens {path}: no `NAME TOKEN` line")
    return tokens


def token_from_file(path: Path, name: str) -> str:
    """A worker's token from `--token-file`: the file's single bare token, or the one on its `NAME TOKEN` line."""
    lines = _lines(path, "--token-file")
    if len(lines) == 1 and len(lines[0]) == 1:
        return lines[0][0]
    if not name:
        raise ConfigError(f"--token-file {path} lists worker tokens: give --name to pick this worker's line")
    for fields in lines:
        if len(fields) == 2 and fields[0] == name:
            return fields[1]
    raise ConfigError(f"--token-file {path} has no line for worker {name[:64]!r}")
