"""Per-worker token files (deploy/tokens.py) and their CLI: `lowband tokens` writes one (mode 0600, never
overwritten), `lowband coordinator --worker-tokens` and `lowband worker --token-file` read it; every problem is
one line naming the entry, never a token, with exit status 2. No sockets: each refusal comes before any bind
or dial."""

from __future__ import annotations

import re
import stat
from pathlib import Path

import pytest

from deploy.cli import main
from deploy.tokens import read_worker_tokens, token_from_file
from protocols.config import ConfigError, to_yaml
from tests.conftest import tiny_config


def _error(capsys: pytest.CaptureFixture[str]) -> str:
    captured = capsys.readouterr()
    lines = (captured.out + captured.err).strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in lines[0], lines
    return lines[0]


def test_lowband_tokens_writes_one_strong_token_per_worker_readable_by_its_owner_only(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "workers.tokens"
    assert main(["tokens", "--workers", "3", "--out", str(out)]) == 0
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    tokens = read_worker_tokens(out)
    assert list(tokens) == ["w0", "w1", "w2"]  # the ids the coordinator would give
    assert len(set(tokens.values())) == 3 and all(re.fullmatch(r"[\w-]{43}", t) for t in tokens.values())
    assert not any(t in capsys.readouterr().out for t in tokens.values())  # printed: names, never tokens
    before = out.read_bytes()
    assert main(["tokens", "--workers", "2", "--out", str(out)]) == 2  # never overwritten
    assert "exists: a token file is never overwritten" in _error(capsys) and out.read_bytes() == before
    assert main(["tokens", "--workers", "2", "--out", str(tmp_path / "x"), "--prefix", "a b"]) == 2
    assert "does not make worker names" in _error(capsys)


def _file(tmp_path: Path, text: str, mode: int = 0o600) -> Path:
    path = tmp_path / "tokens"
    path.write_text(text)
    path.chmod(mode)
    return path


STRONG = "x" * 20


@pytest.mark.parametrize(("text", "mode", "says"), [
    (f"w0 {STRONG}\nw1\n", 0o600, "entry 2: expected `NAME TOKEN`, got 1 field(s)"),
    ("w0 short\n", 0o600, "worker w0's token is shorter than 16 characters"),
    (f"w0 {STRONG}\nw0 {'y' * 20}\n", 0o600, "entry 2: worker w0 is listed twice"),
    (f"w0 {STRONG}\nw1 {STRONG}\n", 0o600, "worker w1's token is also another worker's"),
    (f"w/0 {STRONG}\n", 0o600, "'w/0' is not a worker name"),
    (f"w0 {STRONG}\n", 0o644, "others may read it (mode 0644)"),
    ("# nothing but a comment\n\n", 0o600, "no `NAME TOKEN` line"),
], ids=["one field", "short", "twice", "shared token", "bad name", "world-readable", "empty"])
def test_a_malformed_token_file_is_refused_by_entry_naming_no_token(tmp_path: Path, text: str, mode: int,
                                                                      says: str) -> None:
    with pytest.raises(ConfigError) as err:
        read_worker_tokens(_file(tmp_path, text, mode))
    assert says in str(err.value) and STRONG not in str(err.value)


def test_a_worker_reads_its_own_line_or_a_bare_token(tmp_path: Path) -> None:
    listed = _file(tmp_path, f"# made by lowband tokens\nw0 {STRONG}\nw1 {'y' * 20}\n")
    assert token_from_file(listed, "w1") == "y" * 20
    with pytest.raises(ConfigError, match="lists worker tokens: give --name"):
        token_from_file(listed, "")
    with pytest.raises(ConfigError, match="has no line for worker 'w7'"):
        token_from_file(listed, "w7")
    bare = tmp_path / "mine"
    bare.write_text(STRONG + "\n")
    bare.chmod(0o600)
    assert token_from_file(bare, "") == STRONG


def test_the_cli_refuses_token_file_problems_in_one_line_with_status_2(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    loose = _file(tmp_path, f"w0 {STRONG}\n", 0o644)
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(to_yaml(tiny_config(run_dir=str(tmp_path / "runs"))))
    assert main(["coordinator", str(recipe), "--bind", "127.0.0.1:0", "--worker-tokens", str(loose)]) == 2
    assert "chmod 600" in _error(capsys) and not (tmp_path / "runs").exists()  # refused before anything is written
    assert main(["worker", "--join", "127.0.0.1:1", "--token", "t", "--token-file", str(loose)]) == 2
    assert "--token and --token-file both give the worker's token" in _error(capsys)
    loose.chmod(0o600)
    assert main(["worker", "--join", "127.0.0.1:1", "--name", "w5", "--token-file", str(loose)]) == 2
    assert "has no line for worker 'w5'" in _error(capsys)
