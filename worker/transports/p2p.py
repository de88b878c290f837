"""`cluster.transport: p2p`: gossip worker to worker over gRPC; the coordinator only does rendezvous.

Each worker serves the `Peer` service (worker/transports/peer_servicer.py) on its own port and enrolls with
the coordinator's Rendezvous giving that address; the rendezvous tells every worker where the others listen
(`roster`), and never sees a tensor. A message goes to a neighbour as one client stream: a `PeerHeader`, then
its payloads in 1-4 MiB `TensorChunk`s (the same chunk encoding as every other stream).

- Sending runs on a small thread pool (`send` returns a `Handle[bool]` at once). Channels are dialled on first
  use and cached, with the raised message limits of `protocols.wire.messages.GRPC_OPTIONS`. A neighbour that
  answers "not ready" is alive but still building its model, one that answers "server busy" serves its
  maximum of streams: both retried with backoff for `retry_for_s`. One that
  cannot be reached is gone (it served before it enrolled, so it was up once): retried for CONNECT_RETRY_S
  if it never took a message yet (a blip while it starts), else not at all. Then the send is False, logged,
  never raised, and the round loop goes on without it.
- Receiving: the servicer checks every incoming message (run, token, sender, step window, then its tensors
  against this node's model) and files it in an inbox keyed by (step, sender); `receive` waits on the inbox's
  condition variable for the senders it wants, up to the timeout (worker/transports/peer_inbox.py).
- Bytes: every message both ways, as serialized on the wire: streams and acks with neighbours, and the
  (small) rendezvous calls.

The peer links carry no TLS: peers authenticate each other by the run's peer token (EnrollReply.peer_token, a
secret the rendezvous makes), in every message's header; the run's own token goes only to the rendezvous, in
Enroll, and every later rendezvous call carries this worker's session (worker/rendezvous_client.py).
"""

from __future__ import annotations

import contextlib
import logging
import re
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any

import grpc
import yaml

from protocols.config import PROTOCOL_VERSION, RunConfig, parse_config
from protocols.replica import Params
from protocols.wire import lowband_pb2_grpc, serde
from protocols.wire import messages as m
from protocols.wire.servicing import SERVER_OPTIONS, listen
from worker.backoff import Backoff
from worker.client import BEAT_JOIN_S
from worker.rendezvous_client import RendezvousClient
from worker.transports.base import Handle
from worker.transports.peer_check import PeerExpectation, gossip_codecs
from worker.transports.peer_inbox import PeerInbox
from worker.transports.peer_servicer import NOT_READY, PEER_THREADS, PeerGate, PeerServicer
from worker.transports.peers import PeerMessage, PeerTransport, Roster

log = logging.getLogger(__name__)
_BACKOFF_MAX_S = 2.0
# How long an unreachable neighbour that never took a message is retried (see the module docstring).
CONNECT_RETRY_S = 5.0
# On close, how long sends still in flight (the last step's messages) may take before they are cancelled.
CLOSE_GRACE_S = 30.0


class _Heartbeat(threading.Thread):
    """Keeps the rendezvous from declaring a worker dead during long inner loops (a missed beat is retried)."""

    def __init__(self, client: RendezvousClient, interval: float) -> None:
        super().__init__(daemon=True, name="lowband-p2p-heartbeat")
        self.client, self.interval = client, interval
        self.round = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(self.interval):
            with contextlib.suppress(Exception):
                self.client.heartbeat(self.round, retry=False)


def _advertised(bind: str, port: int, advertise: str | None) -> str:
    """The address peers dial: `advertise` as given when it names a port ("HOST:PORT"), else its host (or the
    bind host; this machine's name for a wildcard bind) with the bound port."""
    if advertise and re.search(r":\d+$", advertise):
        return advertise
    host = advertise or bind.rsplit(":", 1)[0]
    if host in ("", "0.0.0.0", "[::]", "::"):
        host = socket.gethostname()
    return f"{host}:{port}"


class P2PTransport(PeerTransport):
    def __init__(
        self,
        rendezvous: str,
        token: str = "",
        bind: str = "127.0.0.1:0",
        advertise: str | None = None,
        worker_name: str = "",
        *,
        chunk_bytes: int = m.DEFAULT_CHUNK_BYTES,
        send_threads: int = 4,
        retry_for_s: float = 60.0,
        send_timeout_s: float = 600.0,
        codecs: frozenset[str] | None = None,
        max_steps_ahead: int | None = None,
    ) -> None:
        """Bind and start serving at once (refusing messages until `start`); join the rendezvous at `rendezvous`
        in `enroll` (or `start`). `codecs`: the payload codecs accepted from peers (None: the run's, see
        `peer_check.gossip_codecs`). `max_steps_ahead`: how far past this node's step a message may be (None:
        four rounds' worth, see peer_inbox.py)."""
        self.token, self.worker_name = token, worker_name
        self.chunk_bytes, self.retry_for_s, self.send_timeout_s = chunk_bytes, retry_for_s, send_timeout_s
        self.codecs, self.max_steps_ahead = codecs, max_steps_ahead
        self.index, self.workers = -1, 0
        self.worker_id = self.run_id = ""
        self.peer_token = ""  # the run's peer secret from Enroll: what Gossip messages carry, never `token`
        self.cfg: RunConfig | None = None
        self.client = RendezvousClient(rendezvous, token, retry_for_s)
        self.addresses: dict[int, str] = {}
        self._lock = threading.Lock()  # counters, channels, addresses: touched by sender and handler threads
        self._sent = self._received = 0
        self._channels: dict[str, tuple[grpc.Channel, lowband_pb2_grpc.PeerStub]] = {}
        self._reached: set[int] = set()  # nodes that took a message: a later UNAVAILABLE means they are gone
        self._closing = threading.Event()  # close() began: stop retrying
        self._closed = threading.Event()  # channels closed: start nothing new
        self._beat: _Heartbeat | None = None
        self._pending: set[Future[bool]] = set()
        self.inbox = PeerInbox(max_steps_ahead if max_steps_ahead is not None else 0)
        self.undelivered: list[str] = []  # why each message a peer refused or never got was not delivered
        self.servicer = PeerServicer(self.inbox, self._count)
        # Handler threads: every gossip slot, plus room for quick refusals (peer_servicer.py); past them calls
        # queue, and past the concurrency bound gRPC refuses them with RESOURCE_EXHAUSTED.
        self.server = grpc.server(ThreadPoolExecutor(max_workers=PEER_THREADS, thread_name_prefix="lowband-peer"),
                                  options=SERVER_OPTIONS, maximum_concurrent_rpcs=2 * PEER_THREADS)
        lowband_pb2_grpc.add_PeerServicer_to_server(self.servicer, self.server)
        port = listen(self.server, bind, "gossip Peer service")  # a port in use fails (no SO_REUSEPORT)
        self.address = _advertised(bind, port, advertise)
        self.server.start()
        self._pool = ThreadPoolExecutor(max_workers=send_threads, thread_name_prefix="lowband-gossip-send")

    # ---- counters ----------------------------------------------------------------------------------
    def _count(self, sent: int, received: int) -> None:
        with self._lock:
            self._sent += sent
            self._received += received

    @property
    def bytes_sent(self) -> int:
        return self._sent + self.client.bytes_sent

    @property
    def bytes_received(self) -> int:
        return self._received + self.client.bytes_received

    # ---- rendezvous --------------------------------------------------------------------------------
    def enroll(self) -> RunConfig:
        """Join the rendezvous with this node's address (once); the run's config. The index it assigns is this
        node's place in the gossip graph and its data shard."""
        if self.cfg is not None:
            return self.cfg
        reply = self.client.enroll(socket.gethostname(), self.address, self.worker_name)
        cfg = parse_config(yaml.safe_load(reply.config_yaml))
        self.index, self.workers = reply.worker_index, cfg.cluster.workers
        self.worker_id, self.run_id, self.peer_token = reply.worker_id, reply.run_id, reply.peer_token
        if self.max_steps_ahead is None:
            self.inbox.max_ahead = 4 * int(getattr(cfg.protocol, "gossip_steps", 1))
        # Beat from now on: building the corpus and model can take longer than the heartbeat timeout.
        self._beat = _Heartbeat(self.client, reply.heartbeat_interval_s)
        self._beat.start()
        self.cfg = cfg
        return cfg

    def start(self, params: Params, base_digest: str = "") -> Roster:
        cfg = self.enroll()
        if base_digest:
            self.client.attest_base(base_digest)
        expect = PeerExpectation.of(params, self.codecs if self.codecs is not None else gossip_codecs(cfg),
                                    cfg.cluster.max_update_ratio)
        q = int(getattr(cfg.protocol, "gossip_steps", 1))
        self.servicer.open(PeerGate(self.run_id, self.peer_token, self.index, self.workers, q, cfg.rounds * q, expect,
                                    cfg.cluster.stream_idle_s))
        return self.roster(0)

    def roster(self, round_: int) -> Roster:
        reply = self.client.roster(round_)
        if self._beat is not None:
            self._beat.round = round_
        with self._lock:
            for node, address in reply.addresses.items():
                if self.addresses.get(node) != address:
                    self._reached.discard(node)  # a new address is a new process: it may still be starting
            self.addresses = dict(reply.addresses)
        return Roster(reply.round, reply.workers, reply.finished, dict(reply.addresses))

    def report(self, round_: int, metrics: dict[str, float]) -> None:
        self.client.report(round_, metrics)

    # ---- peers -------------------------------------------------------------------------------------
    def _stub(self, address: str) -> lowband_pb2_grpc.PeerStub | None:
        with self._lock:
            if self._closed.is_set():
                return None
            if address not in self._channels:
                channel = grpc.insecure_channel(address, options=m.GRPC_OPTIONS)
                self._channels[address] = (channel, lowband_pb2_grpc.PeerStub(channel))
            return self._channels[address][1]

    def _count_out(self, msgs: Iterable[Any]) -> Iterator[Any]:
        for msg in msgs:
            self._count(msg.ByteSize(), 0)
            yield msg

    def send(self, to: int, message: PeerMessage) -> Handle[bool]:
        future = self._pool.submit(self._send, to, message)
        with self._lock:
            self._pending.add(future)
        future.add_done_callback(self._settled)
        return Handle(future)

    def _settled(self, future: Future[bool]) -> None:
        with self._lock:
            self._pending.discard(future)

    def _send(self, to: int, message: PeerMessage) -> bool:
        with self._lock:
            address = self.addresses.get(to)
        if address is None:
            log.warning("node %d is not in the roster: gossip step %d not sent to it", to, message.step)
            return False
        envelope = m.Envelope(self.run_id, self.worker_id, message.round, PROTOCOL_VERSION, self.peer_token)
        header = m.PeerHeader(envelope=envelope, step=message.step, sender=self.index, weight=message.weight,
                              num_entries=len(message.payloads), total_bytes=message.nbytes())
        stub = self._stub(address)
        if stub is None:
            log.info("transport closed: gossip step %d not sent to node %d", message.step, to)
            return False
        backoff, started = Backoff(cap_s=_BACKOFF_MAX_S), time.monotonic()
        while True:
            try:
                stream = self._count_out(serde.peer_stream(header, message.payloads, self.chunk_bytes))
                reply = stub.Gossip(stream, timeout=self.send_timeout_s)
            except grpc.RpcError as err:
                code, details = err.code(), err.details() or ""
                window = 0.0
                if code is grpc.StatusCode.RESOURCE_EXHAUSTED and details.startswith(m.BUSY_PREFIXES):
                    window = self.retry_for_s  # the neighbour serves its maximum of streams: it will have room
                elif code is grpc.StatusCode.UNAVAILABLE:
                    if details.startswith(NOT_READY):
                        window = self.retry_for_s
                    elif to not in self._reached:
                        window = min(CONNECT_RETRY_S, self.retry_for_s)
                if time.monotonic() - started < window and not self._closing.is_set():
                    backoff.wait()
                    continue
                why = f"gossip step {message.step} to node {to} at {address} not delivered: {code.name}: {details}"
                log.warning("%s", why)
                with self._lock:
                    self.undelivered.append(why)
                return False
            except m.WireError as err:  # our own message cannot travel (e.g. a dtype the wire lacks)
                log.warning("gossip step %d to node %d not sent: %s", message.step, to, err)
                return False
            self._count(0, reply.ByteSize())
            with self._lock:
                self._reached.add(to)
            return True

    def receive(self, step: int, senders: set[int], timeout_s: float) -> dict[int, PeerMessage]:
        return self.inbox.take(step, senders, timeout_s)

    def close(self) -> None:
        if self._closing.is_set():
            return
        self._closing.set()
        if self._beat is not None:
            self._beat.stop.set()
            self._beat.join(timeout=BEAT_JOIN_S)  # not left inside a call when the process exits
        # The last step's messages may still be streaming: let them finish (a hung peer for CLOSE_GRACE_S at
        # most), then cancel what is left by closing the channels; retries see `_closing` and give up.
        with self._lock:
            pending = list(self._pending)
        wait(pending, timeout=CLOSE_GRACE_S)
        with self._lock:
            self._closed.set()
            for channel, _ in self._channels.values():
                channel.close()
            self._channels.clear()
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self.cfg is not None:
            with contextlib.suppress(Exception):  # leaving is best effort: the rendezvous times a silent worker out
                self.client.leave()
        self.server.stop(grace=1.0).wait()
        self.client.close()
