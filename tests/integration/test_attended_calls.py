"""A worker waiting in a long poll sends no heartbeat: the coordinator counts its open call as proof of life
(`CoordinatorState.attend`), and counts its silence from when the call ended. On a real coordinator on loopback
with a 1 s heartbeat timeout: a worker in a 3 s WaitRound stays alive while a silent one is dropped; a worker
killed with SIGKILL inside its long poll is dropped within the timeout (its connection closed, its call ended);
and one whose link goes silent (a proxy that stops forwarding, the connection left open) is found by the
server's keepalive pings and dropped, long before its 30 s poll would have ended."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import grpc

from coordinator.server import CoordinatorServer
from tests.integration.hostile import TOKEN, running
from tests.integration.procs import STARTED, wait_for
from worker.client import CoordinatorClient

TIMEOUT_S = 1.0  # heartbeat_timeout_s: keepalive pings every 0.25 s, unanswered for 0.25 s
LIVENESS = {"heartbeat_interval_s": 0.25, "heartbeat_timeout_s": TIMEOUT_S}


def _alive(server: CoordinatorServer) -> dict[str, bool]:
    return {m.worker_id: m.alive for m in server.state.members_copy()}


def _open_calls(server: CoordinatorServer, worker_id: str) -> int:
    return next(m.calls_open for m in server.state.members_copy() if m.worker_id == worker_id)


def test_a_worker_in_a_long_poll_stays_alive_without_heartbeats_and_a_silent_one_does_not() -> None:
    with running(**LIVENESS) as (server, (silent, waiting)):
        began = time.monotonic()
        info = waiting.wait_round(0, max_wait_s=3 * TIMEOUT_S)  # round 0 stays open: nobody pushes
        assert info.round == 0 and time.monotonic() - began >= 3 * TIMEOUT_S
        assert _alive(server) == {silent.worker_id: False, waiting.worker_id: True}
        # The call's end is counted once the server has finished it, which can be just after its reply arrived.
        wait_for(lambda: _open_calls(server, waiting.worker_id) == 0, 10 * TIMEOUT_S, "the call's end to be counted")
        wait_for(lambda: not _alive(server)[waiting.worker_id], 10 * TIMEOUT_S, "the silence after the call")


def test_a_worker_killed_inside_its_long_poll_is_dropped_within_the_timeout() -> None:
    with running(**LIVENESS) as (server, (_, second)):
        child = subprocess.Popen([sys.executable, "-c", (
            "import sys; from worker.client import CoordinatorClient\n"
            "c = CoordinatorClient(sys.argv[1], token=sys.argv[2]); c.join('child', requested_id=sys.argv[3])\n"
            "c.wait_round(0, max_wait_s=30.0)"), server.address, TOKEN, second.worker_id])
        STARTED.append(child)
        wait_for(lambda: _open_calls(server, second.worker_id) == 1, 60, "the child's long poll")
        time.sleep(2 * TIMEOUT_S)
        assert _alive(server)[second.worker_id], "dropped while its long poll was open"
        child.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        child.wait(timeout=30)
        wait_for(lambda: not _alive(server)[second.worker_id], 30, "the killed worker to be dropped")
        assert time.monotonic() - killed < 3 * TIMEOUT_S
        assert _open_calls(server, second.worker_id) == 0


class Proxy:
    """A TCP proxy on loopback that can go silent: `freeze` stops it forwarding anything either way while
    both connections stay open, as a dead link or a frozen machine would."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.frozen = threading.Event()
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            self.sockets += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        src.settimeout(0.05)
        while True:
            if self.frozen.is_set():
                time.sleep(0.05)
                continue
            try:
                data = src.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            if not data:
                return
            try:
                dst.sendall(data)
            except OSError:
                return

    def freeze(self) -> None:
        self.frozen.set()

    def close(self) -> None:
        self.listener.close()
        for s in self.sockets:
            s.close()


@contextmanager
def proxied(server: CoordinatorServer) -> Iterator[Proxy]:
    proxy = Proxy(server.port)
    try:
        yield proxy
    finally:
        proxy.close()


def test_a_worker_behind_a_dead_link_is_found_by_keepalive_and_dropped() -> None:
    with running(**LIVENESS) as (server, (_, second)), proxied(server) as proxy:
        client = CoordinatorClient(f"127.0.0.1:{proxy.port}", token=TOKEN, retry_for_s=0.0)
        try:
            client.join("behind-a-proxy", requested_id=second.worker_id)
            outcome: list[object] = []

            def poll() -> None:
                try:
                    outcome.append(client.wait_round(0, max_wait_s=30.0))
                except grpc.RpcError as err:
                    outcome.append(err.code())

            poller = threading.Thread(target=poll, daemon=True)
            poller.start()
            wait_for(lambda: _open_calls(server, second.worker_id) == 1, 60, "the long poll through the proxy")
            time.sleep(2 * TIMEOUT_S)
            assert _alive(server)[second.worker_id], "dropped while its long poll was open and its link alive"
            proxy.freeze()
            frozen = time.monotonic()
            wait_for(lambda: not _alive(server)[second.worker_id], 30, "the silent worker to be dropped")
            assert time.monotonic() - frozen < 4 * TIMEOUT_S  # keepalive's 0.5 s, the timeout, a tick or two
            assert _open_calls(server, second.worker_id) == 0
            assert not outcome, "the client's call ended: the proxy, not the client, was cut off"
        finally:
            client.close()
