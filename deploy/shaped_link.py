"""Real kernel shaping for tests: two network namespaces joined by a veth pair, each end's egress shaped by `tc`.

    with ShapedLink(rate_mbit=20, delay_ms=10) as link:
        subprocess.run(link.exec_argv(link.ns_b, ["python3", "server.py", link.addr_b]))  # ...

Each end sends through `tc qdisc ... netem rate <R>mbit delay <D>ms` where the kernel has netem, else through
`tbf rate <R>mbit` (token bucket filter: bandwidth only, no delay; `ShapedLink` refuses a delay then). Both
meter whole frames (Ethernet + IP + TCP headers), not the payload an application counts. Rates are SI: 1 mbit
= 10^6 bits per second, as in `worker.transports.link.LinkModel`.

`shaping_problem()` says why shaping cannot be done here (not root, no `ip`/`tc`, no namespaces, neither
qdisc), or None. Works from the root namespace and from inside deploy/loopback.sh's namespace alike: `ip netns
add` makes fresh namespaces whichever one the caller is in, and the veth ends are created straight in them.
Everything is removed on exit, on error included (a SIGKILL leaves two entries under /run/netns).
"""

from __future__ import annotations

import functools
import json
import os
import secrets
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType

VETH_A, VETH_B = "veth0", "veth1"  # names only need be unique inside their namespace
ADDR_A, ADDR_B = "10.210.0.1", "10.210.0.2"  # reachable only between the two namespaces
MTU = 1500


class ShapingError(RuntimeError):
    """An `ip` or `tc` command failed; the message names it and what it printed."""


def _run(argv: Sequence[str]) -> str:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        said = proc.stderr.strip() or proc.stdout.strip()
        raise ShapingError(f"`{' '.join(argv)}` failed ({proc.returncode}): {said}")
    return proc.stdout


def _unique(prefix: str) -> str:
    return f"{prefix}-{os.getpid()}-{secrets.token_hex(3)}"


def _delete_netns(name: str) -> None:
    subprocess.run(["ip", "netns", "delete", name], capture_output=True, timeout=30)


@dataclass(frozen=True)
class Support:
    """What this machine allows: `problem` is why shaping is impossible (None: possible); `netem` whether
    the netem qdisc (rate and delay) exists, else only tbf (rate)."""

    problem: str | None
    netem: bool


@functools.cache
def support() -> Support:
    """Probe once per process: a throwaway namespace, a qdisc tried on its loopback, removed again."""
    if os.geteuid() != 0:
        return Support("kernel shaping needs root (network namespaces, veth pairs and tc)", False)
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        return Support(f"kernel shaping needs iproute2; not on PATH: {', '.join(missing)}", False)
    ns = _unique("lbprobe")
    try:
        _run(["ip", "netns", "add", ns])
    except (ShapingError, OSError, subprocess.TimeoutExpired) as err:
        return Support(f"cannot create a network namespace: {err}", False)
    try:
        _run(["ip", "-n", ns, "link", "set", "lo", "up"])
        netem = _qdisc_works(ns, ["netem", "rate", "10mbit", "delay", "1ms"])
        if not netem and not _qdisc_works(ns, ["tbf", "rate", "10mbit", "burst", "16kb", "latency", "50ms"]):
            return Support("the kernel has neither the netem nor the tbf qdisc", False)
        return Support(None, netem)
    except (ShapingError, OSError, subprocess.TimeoutExpired) as err:
        return Support(f"cannot set up a network namespace: {err}", False)
    finally:
        _delete_netns(ns)


def _qdisc_works(ns: str, qdisc: list[str]) -> bool:
    try:
        _run(["tc", "-n", ns, "qdisc", "add", "dev", "lo", "root", *qdisc])
    except ShapingError:
        return False
    _run(["tc", "-n", ns, "qdisc", "del", "dev", "lo", "root"])
    return True


def shaping_problem() -> str | None:
    """Why kernel shaping is impossible here, or None when `ShapedLink` can be used."""
    return support().problem


class ShapedLink:
    """Namespaces `ns_a` (address `addr_a`) and `ns_b` (`addr_b`) joined by a veth pair whose ends each send
    at `rate_mbit` after `delay_ms` (netem), or at `rate_mbit` alone (tbf, `qdisc == "tbf"`)."""

    def __init__(self, rate_mbit: float, delay_ms: float = 0.0) -> None:
        if not rate_mbit > 0 or delay_ms < 0:
            raise ValueError(f"need rate_mbit > 0 and delay_ms >= 0, got {rate_mbit}, {delay_ms}")
        self.rate_mbit, self.delay_ms = rate_mbit, delay_ms
        base = _unique("lbshape")
        self.ns_a, self.ns_b = base + "-a", base + "-b"
        self.addr_a, self.addr_b, self.mtu = ADDR_A, ADDR_B, MTU
        self.qdisc = ""
        self._made: list[str] = []

    def _shaping(self, netem: bool) -> list[str]:
        rate = f"{self.rate_mbit:g}mbit"
        if netem:
            # The queue (in packets, GSO packets count one) must hold a window at this delay: no drops.
            return ["netem", "rate", rate, "delay", f"{self.delay_ms:g}ms", "limit", "10000"]
        # A burst of a few frames (at least 4 ms of traffic, the coarsest timer tbf may run on): the first
        # burst leaves unshaped. `latency` bounds the queue; generous so that TCP is not made to drop.
        burst = max(16 * 1024, int(self.rate_mbit * 1e6 / 8 * 0.004))
        return ["tbf", "rate", rate, "burst", str(burst), "latency", "200ms"]

    def __enter__(self) -> ShapedLink:
        found = support()
        if found.problem is not None:
            raise ShapingError(found.problem)
        if self.delay_ms > 0 and not found.netem:
            raise ShapingError("this kernel has no netem qdisc: tbf shapes bandwidth only, not delay")
        self.qdisc = "netem" if found.netem else "tbf"
        try:
            for ns in (self.ns_a, self.ns_b):
                _run(["ip", "netns", "add", ns])
                self._made.append(ns)
                _run(["ip", "-n", ns, "link", "set", "lo", "up"])
            _run(["ip", "link", "add", VETH_A, "netns", self.ns_a, "mtu", str(self.mtu), "type", "veth",
                  "peer", "name", VETH_B, "netns", self.ns_b, "mtu", str(self.mtu)])
            for ns, dev, addr in ((self.ns_a, VETH_A, self.addr_a), (self.ns_b, VETH_B, self.addr_b)):
                _run(["ip", "-n", ns, "addr", "add", f"{addr}/30", "dev", dev])
                _run(["ip", "-n", ns, "link", "set", dev, "up"])
                _run(["tc", "-n", ns, "qdisc", "add", "dev", dev, "root", *self._shaping(found.netem)])
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._remove()

    def _remove(self) -> None:
        """Deleting a namespace deletes its veth end, which deletes the pair and the qdiscs on it."""
        while self._made:
            _delete_netns(self._made.pop())

    def exec_argv(self, ns: str, argv: Sequence[str]) -> list[str]:
        """`argv` run inside namespace `ns` (one of `ns_a`, `ns_b`)."""
        return ["ip", "netns", "exec", ns, *argv]

    def egress_bytes(self, ns: str) -> int:
        """Bytes the shaping qdisc of namespace `ns`'s veth end has sent so far (whole frames, as it meters)."""
        dev = VETH_A if ns == self.ns_a else VETH_B
        stats = json.loads(_run(["tc", "-s", "-j", "-n", ns, "qdisc", "show", "dev", dev]))
        return int(next(q["bytes"] for q in stats if q.get("root")))
