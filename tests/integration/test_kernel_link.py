"""The WAN emulation (worker/transports/link.py) against real kernel shaping (deploy/shaped_link.py): the same
bytes take the same time, within 10%, on a `Link` and through a `tc`-shaped veth pair between two namespaces.

The kernel side: one TCP connection from namespace A to namespace B, timed from the sender's first byte (just
after `connect`) to the receiver's last. Both ends are separate processes; they read the same CLOCK_MONOTONIC
(network namespaces share it). The emulation side: a real `Link` around a transport that counts the bytes of
the update it is handed, timed on the wall clock around `exchange(...).result()`.

TCP overhead, modelled rather than absorbed by the tolerance: tc meters whole frames, so each segment of at
most MSS payload bytes costs `mtu - mss` bytes of IP and TCP headers (timestamps included) plus a 14-byte
Ethernet header, about 4.6% at MTU 1500. The update handed to the `Link` is that many bytes: the bytes the
wire carried for the payload. The model is checked against the qdisc's own byte counter. What is left out:
the handshake and FIN (a few hundred bytes), and the shaper's initial burst (at most 16 KiB leave unshaped,
under 1% of a transfer here). With netem, the delayed case also pays TCP slow start (a few round trips at
10 ms, ~2%), which the `Link` has no notion of.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch

from compression.payload import dense
from deploy.shaped_link import ShapedLink, support
from protocols.base import Aggregate, Update
from protocols.replica import Params, Replica
from worker.transports.base import Handle, RoundResult, RoundStatus, Transport
from worker.transports.link import Link, LinkModel

TOLERANCE = 0.10
ETHERNET_HEADER = 14  # what the qdisc meters besides the IP packet (no FCS, no preamble on a veth)
PORT = 5201  # the namespaces are fresh: nothing else listens there

RECEIVER = r"""
import socket, sys, time
expected = int(sys.argv[2])
server = socket.create_server((sys.argv[1], int(sys.argv[3])))
print("ready", flush=True)
conn, _ = server.accept()
got = 0
while got < expected:
    chunk = conn.recv(1 << 20)
    if not chunk:
        break
    got += len(chunk)
print(got, time.monotonic(), flush=True)
"""

SENDER = r"""
import socket, sys, time
payload = bytes(int(sys.argv[2]))
sock = socket.create_connection((sys.argv[1], int(sys.argv[3])))
start = time.monotonic()
sock.sendall(payload)
print(start, sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG), flush=True)
sock.close()
"""


class CountingTransport(Transport):
    """Moves an update by counting its bytes as sent; nothing comes back. What is under test is the time the
    wrapping `Link` holds the caller for them."""

    worker_id = "w0"

    def start(self, params: Params, base_digest: str = "") -> Replica:
        return Replica(0, params)

    def status(self, after_round: int) -> RoundStatus:
        return RoundStatus(after_round + 1, False, "")

    def exchange(self, round_: int, update: Update, metrics: dict[str, float]) -> Handle[RoundResult]:
        self._sent += update.nbytes()
        return Handle.completed(RoundResult(True, Aggregate(round_), ""))

    def resync(self) -> Replica:
        return Replica(0, {})


def frame_bytes(payload: int, mss: int, mtu: int) -> int:
    """Bytes tc meters for `payload` bytes of one bulk TCP stream: full segments of `mss` payload bytes (the
    last one shorter), each with `mtu - mss` bytes of IP/TCP headers and options and an Ethernet header."""
    segments = -(-payload // mss)
    return payload + segments * (mtu - mss + ETHERNET_HEADER)


def kernel_transfer(link: ShapedLink, nbytes: int) -> tuple[float, int]:
    """Send `nbytes` over TCP from `link.ns_a` to `link.ns_b`: (seconds from first byte sent to last byte
    received, the sender's MSS)."""
    receiver = subprocess.Popen(
        link.exec_argv(link.ns_b, [sys.executable, "-c", RECEIVER, link.addr_b, str(nbytes), str(PORT)]),
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert receiver.stdout is not None
        assert receiver.stdout.readline().strip() == "ready", "the receiver did not start"
        sent = subprocess.run(
            link.exec_argv(link.ns_a, [sys.executable, "-c", SENDER, link.addr_b, str(nbytes), str(PORT)]),
            capture_output=True, text=True, timeout=60, check=True,
        )
        got, done = receiver.stdout.readline().split()
        assert receiver.wait(timeout=30) == 0
    finally:
        if receiver.poll() is None:
            receiver.kill()
            receiver.wait(timeout=30)
    assert int(got) == nbytes, f"the receiver got {got} of {nbytes} bytes"
    start, mss = sent.stdout.split()
    return float(done) - float(start), int(mss)


def emulated_transfer(model: LinkModel, nbytes: int) -> float:
    """Seconds a `Link` with `model` holds the caller of an exchange whose update is `nbytes` long."""
    link = Link(CountingTransport(), model)
    update = Update({"frames": dense(torch.zeros(nbytes, dtype=torch.uint8))})
    try:
        start = time.monotonic()
        link.exchange(0, update, {}).result(timeout=60)
        elapsed = time.monotonic() - start
    finally:
        link.close()
    assert link.bytes_sent == nbytes
    return elapsed


@pytest.mark.parametrize(
    ("rate_mbit", "nbytes", "delay_ms"),
    [
        pytest.param(20, 2_500_000, 0, id="20mbit-2.5MB"),  # ~1.05 s
        pytest.param(50, 5_000_000, 0, id="50mbit-5MB"),  # ~0.84 s
        pytest.param(20, 2_500_000, 10, id="20mbit-2.5MB-10ms"),  # netem only
    ],
)
def test_emulation_and_kernel_agree_on_transfer_time(rate_mbit: int, nbytes: int, delay_ms: int) -> None:
    found = support()
    if found.problem is not None:
        pytest.skip(f"no kernel shaping here: {found.problem}")
    if delay_ms and not found.netem:
        pytest.skip("this kernel has no netem qdisc; tbf shapes bandwidth only, so latency is not compared here")

    with ShapedLink(rate_mbit, delay_ms) as shaped:
        kernel_s, mss = kernel_transfer(shaped, nbytes)
        wire = frame_bytes(nbytes, mss, shaped.mtu)
        metered = shaped.egress_bytes(shaped.ns_a)
    # The framing model against what the qdisc counted (the handshake and FIN are the rest).
    assert wire <= metered < wire * 1.01, f"modelled {wire} frame bytes, the qdisc sent {metered}"

    emulated_s = emulated_transfer(LinkModel(bandwidth_mbps=rate_mbit, latency_ms=delay_ms), wire)
    error = abs(kernel_s - emulated_s) / kernel_s
    print(
        f"\n{rate_mbit} Mbit/s {delay_ms} ms ({shaped.qdisc}), {nbytes} B payload = {wire} B frames (mss {mss}): "
        f"kernel {kernel_s:.4f} s, Link {emulated_s:.4f} s, off by {error:.1%}"
    )
    assert error < TOLERANCE, f"kernel {kernel_s:.3f} s vs Link {emulated_s:.3f} s: {error:.1%} apart"
