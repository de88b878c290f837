"""Argument types and the parser class of the `lowband` command line: every bad argument is one line on
stderr and exit status 2, naming the option and what was wrong (argparse's default prints its usage
block too)."""

from __future__ import annotations

import argparse
import ipaddress
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from protocols.config import ConfigError


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line: `lowband worker: error: ... (see --help)`."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        sys.exit(2)


def _split_host_port(text: str, what: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise argparse.ArgumentTypeError(f"{what} {text!r} must be HOST:PORT (e.g. 127.0.0.1:7070): no port given")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]  # [::1]:7070
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} {text!r}: {host!r} is not an IPv6 address") from None
    elif ":" in host:
        raise argparse.ArgumentTypeError(f"{what} {text!r}: write an IPv6 address in brackets, e.g. [::1]:7070")
    if not port.isdigit():
        raise argparse.ArgumentTypeError(f"{what} {text!r}: port {port!r} is not a number")
    return host, int(port)


def join_address(text: str) -> str:
    """HOST:PORT a worker dials: port in 1..65535 (no silent default port, no wrap-around)."""
    _, port = _split_host_port(text, "address")
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"address {text!r}: port {port} is out of range 1..65535")
    return text


def bind_address(text: str) -> str:
    """HOST:PORT a server listens on: port in 0..65535 (0 picks a free one)."""
    _, port = _split_host_port(text, "bind address")
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"bind address {text!r}: port {port} is out of range 0..65535 "
                                         "(0 picks a free one)")
    return text


def readable_file(text: str) -> str:
    """A path that names an existing, readable file."""
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{text!r} is not a file")
    try:
        with path.open("rb"):
            pass
    except OSError as err:
        raise argparse.ArgumentTypeError(f"{text!r} cannot be read: {err.strerror}") from None
    return text


def _number(kind: Callable[[str], float], low: float, inclusive: bool, what: str) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if value != value or (value < low if inclusive else value <= low) or value == float("inf"):
            bound = f">= {low:g}" if inclusive else f"> {low:g}"
            raise argparse.ArgumentTypeError(f"{text!r} must be a finite number {bound}")
        return value

    parse.__name__ = what
    return parse


positive_int = _number(int, 1, True, "an integer")
non_negative_int = _number(int, 0, True, "an integer")
positive_float = _number(float, 0.0, False, "a number")
non_negative_float = _number(float, 0.0, True, "a number")


def read_pem(path: str | None, what: str) -> bytes | None:
    """The bytes of a PEM file named by option `what`, or None; ConfigError (one line) when it is missing,
    unreadable or holds no PEM block."""
    if not path:
        return None
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise ConfigError(f"{what} {path!r}: {err.strerror or err}") from None
    if b"-----BEGIN " not in data:
        raise ConfigError(f"{what} {path!r} is not a PEM file (no '-----BEGIN' line)")
    return data
