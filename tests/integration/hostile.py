"""Shared by the hostile-input tests: a real coordinator on 127.0.0.1:0 in this process (so a test can read
its state), raw pushes that bypass every client-side check, and a fingerprint of everything a refused
request must leave as it was."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import grpc
import torch

from compression.payload import Payload, dense
from coordinator.server import CoordinatorServer
from protocols.config import PROTOCOL_VERSION
from protocols.wire import lowband_pb2 as pb
from protocols.wire import lowband_pb2_grpc, serde
from protocols.wire import messages as m
from tests.conftest import tiny_config
from tests.integration.procs import wait_for
from tests.integration.stalling import stalled
from worker.client import CoordinatorClient

STATE = {"w": torch.randn(4, 3, generator=torch.Generator().manual_seed(0)), "b": torch.zeros(3)}
UPDATE = {"w": torch.linspace(-0.3, 0.25, 12).reshape(4, 3), "b": torch.tensor([0.1, -0.2, 0.3])}
TOKEN = "s3cret"


@contextmanager
def running(tls: Any = None, protocol: dict[str, Any] | None = None,
            **cluster: Any) -> Iterator[tuple[CoordinatorServer, list[CoordinatorClient]]]:
    """A 2-worker DiLoCo coordinator (dense uplink unless `protocol` says), both workers joined and round 0
    open; with `tls`, the server's TLS material and no clients (the test makes its own)."""
    cfg = tiny_config(protocol=protocol or {"kind": "diloco", "inner_steps": 5},
                      cluster={"workers": 2, "token": TOKEN, "heartbeat_interval_s": 0.5, **cluster})
    server = CoordinatorServer(cfg, tls=tls).start()
    clients: list[CoordinatorClient] = []
    try:
        if tls is None:
            clients = [CoordinatorClient(server.address, token=TOKEN) for _ in range(2)]
            for client in clients:
                client.join("test")
            clients[0].offer_state(STATE)
            assert clients[0].wait_round(-1).round == 0
        yield server, clients
    finally:
        for client in clients:
            client.close()
        server.stop(0)


def fingerprint(server: CoordinatorServer) -> tuple[Any, ...]:
    """What no refused request may change: the replica's hash, the round and phase, the open round's
    folded senders and sums, the members (ids, liveness, bytes and tokens counted) and the history."""
    state = server.state
    agg = state.aggregator
    sums = {} if agg is None else {n: t.clone() for n, t in getattr(agg.acc, "sums", {}).items()}
    members = sorted((w.worker_id, w.alive, w.left, w.bytes_sent, w.tokens) for w in state.members.values())
    return (state.state_hash, state.round, state.phase, None if agg is None else list(agg.senders),
            None if agg is None else agg.acc.count, members, len(state.history), sorted(sums),
            [float(t.abs().sum()) for _, t in sorted(sums.items())])


def envelope(worker_id: str, round_: int = 0, token: str = TOKEN, run_id: str = "") -> m.Envelope:
    return m.Envelope(run_id, worker_id, round_, PROTOCOL_VERSION, token)


def member_envelope(client: CoordinatorClient, round_: int = 0) -> m.Envelope:
    """The envelope of a joined member's call: its run id, id and session (the run's token is for Join only)."""
    return envelope(client.worker_id, round_, client.session, client.run_id)


def header(env: m.Envelope, entries: dict[str, Payload], **fields: Any) -> pb.PushMessage:
    """The first message of a push, as protobuf (fields set on it after encoding: hostile values the
    dataclass would refuse to encode)."""
    head = m.PushHeader(envelope=env, kind=m.PushKind.UPDATE, weight=1.0, num_entries=len(entries),
                        total_bytes=sum(p.nbytes() for p in entries.values()))
    msg = pb.PushMessage(header=serde.to_pb(head))
    for name, value in fields.items():
        if name == "metrics":
            msg.header.metrics.update(value)
        else:
            setattr(msg.header, name, value)
    return msg


def good_entries() -> dict[str, Payload]:
    return {name: dense(t) for name, t in UPDATE.items()}


def push(address: str, messages: Iterable[pb.PushMessage], timeout: float = 30,
         max_send: int = m.MAX_MESSAGE_BYTES) -> Any:
    """One raw push; `max_send` raises the client's own send limit (to reach the server's)."""
    options = [("grpc.max_send_message_length", max_send), ("grpc.max_receive_message_length", m.MAX_MESSAGE_BYTES)]
    with grpc.insecure_channel(address, options=options) as channel:
        return lowband_pb2_grpc.CoordinatorStub(channel).PushUpdate(iter(messages), timeout=timeout)


def chunks(entries: dict[str, Payload]) -> list[pb.PushMessage]:
    return [pb.PushMessage(chunk=c) for c in serde.encode_entries(entries, 64)]


@contextmanager
def admission_held(server: CoordinatorServer, member: CoordinatorClient) -> Iterator[Any]:
    """The coordinator's one admitted slot (the test sets PUSH_READS_PER_CORE to 0) held by `member`'s push whose header
    came and whose stream then stalled; yields that call's future, which ends (INVALID_ARGUMENT: no payload) once
    the block is left."""
    release = threading.Event()
    with grpc.insecure_channel(server.address, options=m.GRPC_OPTIONS) as channel:
        held = lowband_pb2_grpc.CoordinatorStub(channel).PushUpdate.future(
            stalled(release, header(member_envelope(member), good_entries())), timeout=300)
        try:
            wait_for(lambda: server.servicer.admitted.in_use == 1, 60, "the stalled push to be admitted")
            yield held
        finally:
            release.set()
            wait_for(held.done, 60, "the stalled push to end")
