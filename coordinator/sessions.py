"""Who may call the coordinator: the run's secret (or a worker's own token) in the handshake, then a session.

A worker joins (the handshake) with the run's secret `cluster.token` or, when the coordinator was given a
worker-token file (`lowband coordinator --worker-tokens FILE`, written by `lowband tokens`), with its own
token. The join issues a fresh random session credential (`new_session`, returned in JoinReply.session_token)
and every later call of that member carries it in Envelope.token instead, so the secret crosses the wire once
per join, never again. A re-join issues a new session; the old one stops working.

The coordinator holds only SHA-256 digests: of each member's session (in the member table and so in its
checkpoint, which lets a coordinator resumed with `--resume` accept its workers' sessions without a re-join)
and of the worker tokens. Every comparison is constant-time (`hmac.compare_digest`).

A token is required wherever a coordinator can be reached from another machine: `lowband coordinator` and
`lowband run` make one when none is given (`new_run_token`; the first prints it once, the second hands it to
its own workers), and a server given none refuses to listen on anything but loopback (`check_open_bind`).
Only an in-process server on loopback (tests, benches) may run unauthenticated.

The join rule (`Gate.admit`):
- no run token and no worker tokens (loopback only, above): nothing is authenticated; anyone joins under any
  free or known id, and sessions are issued but not checked;
- a run token only: a join presenting it takes any id;
- worker tokens: a worker joins only with its own token and only under its own name (a join that asks for no
  name gets its token's); the run token, if the run has one, admits no join then: it only opens
  `lowband status`.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
from collections.abc import Mapping

from coordinator.errors import Code, Rejected
from protocols.config import ConfigError

# Bytes of randomness in a session credential (token_urlsafe: 43 characters), and in a generated run token.
SESSION_BYTES = 32
RUN_TOKEN_BYTES = 32


def digest(secret: str) -> str:
    """The SHA-256 hex digest of a secret: what the coordinator keeps instead of it."""
    return hashlib.sha256(secret.encode()).hexdigest()


def matches(secret: str, expected: str) -> bool:
    """Whether `secret` hashes to the digest `expected` (constant-time; an empty digest matches nothing)."""
    return bool(expected) and hmac.compare_digest(digest(secret), expected)


def new_run_token() -> str:
    """A fresh random run secret, for a run started without one."""
    return secrets.token_urlsafe(RUN_TOKEN_BYTES)


def is_loopback(bind: str) -> bool:
    """Whether the HOST of `bind` (HOST:PORT, `[v6]:PORT`, or a name) is only this machine's loopback."""
    host = bind.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost may resolve to anything
        return False


def check_open_bind(bind: str, authenticated: bool, who: str) -> None:
    """ConfigError (one line) for a server without any token asked to listen where other machines reach it."""
    if not authenticated and not is_loopback(bind):
        raise ConfigError(f"the {who} has no token and {bind!r} is not loopback: a token is required wherever "
                          f"other machines can connect (cluster.token, or --token / --worker-tokens)")


def new_session() -> tuple[str, str]:
    """A fresh session credential and its digest."""
    credential = secrets.token_urlsafe(SESSION_BYTES)
    return credential, digest(credential)


class Gate:
    """The run's join rule (see the module docstring) and the session check of every later call."""

    def __init__(self, run_token: str, worker_tokens: Mapping[str, str] | None = None,
                 who: str = "coordinator") -> None:
        self.run_digest = digest(run_token) if run_token else ""
        self.worker_digests = {name: digest(token) for name, token in (worker_tokens or {}).items()}
        self.who = who

    @property
    def required(self) -> bool:
        """Whether calls are authenticated at all (a run token or worker tokens were given)."""
        return bool(self.run_digest or self.worker_digests)

    def admit(self, token: str, requested_id: str) -> str:
        """The id a join presenting `token` takes (`requested_id`, or for a worker token with no id asked, its
        name); Rejected UNAUTHENTICATED otherwise. The refusal names no token and no other worker."""
        if self.required and not token:
            raise Rejected(Code.UNAUTHENTICATED, f"no token sent: the {self.who} requires one (a worker gives it "
                                                 f"with --token or --token-file)")
        if not self.worker_digests:
            if self.run_digest and not matches(token, self.run_digest):
                raise Rejected(Code.UNAUTHENTICATED, f"bad token: the {self.who}'s token differs from the one sent")
            return requested_id
        sent = digest(token)
        owner = ""
        for name, expected in self.worker_digests.items():  # every entry compared: the time says nothing
            if hmac.compare_digest(sent, expected):
                owner = name
        if not owner:
            raise Rejected(Code.UNAUTHENTICATED, f"bad token: the {self.who} admits workers by their own tokens "
                                                 f"(--worker-tokens) and the one sent is none of them")
        if requested_id and requested_id != owner:
            raise Rejected(Code.UNAUTHENTICATED, f"bad token: the token sent is not the one of worker "
                                                 f"{requested_id[:64]!r}; a worker joins with its own token")
        return owner

    def check_session(self, token: str, session_digest: str, worker_id: str) -> None:
        """Refuse (UNAUTHENTICATED) a call whose token is not the caller's current session; changes nothing."""
        if self.required and not matches(token, session_digest):
            raise Rejected(Code.UNAUTHENTICATED, f"bad token: not the session of worker {worker_id[:64]!r} (the "
                                                 f"{self.who} may not know it, or it re-joined since): join again")

    def check_operator(self, token: str) -> None:
        """An operator's call (`lowband status`): the run's token, or, in a run with worker tokens only, any of
        them."""
        if not self.required:
            return
        if self.run_digest:
            ok = matches(token, self.run_digest)
        else:
            sent = digest(token)
            ok = any([hmac.compare_digest(sent, d) for d in self.worker_digests.values()])
        if not ok:
            raise Rejected(Code.UNAUTHENTICATED, f"bad token: the {self.who}'s token differs from the one sent")
