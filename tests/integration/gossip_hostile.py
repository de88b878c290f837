"""Shared by the hostile-input tests of a gossip run: a real `RendezvousServer` and two `P2PTransport` peers
on 127.0.0.1:0 in this process (so a test can read their state), raw Gossip streams that bypass the sender's
checks, and fingerprints of everything a refused request must leave as it was."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from compression.payload import dense
from coordinator.rendezvous_server import RendezvousServer
from protocols.config import PROTOCOL_VERSION
from protocols.replica import Params
from protocols.wire import lowband_pb2 as pb
from protocols.wire import messages as m
from protocols.wire import serde
from tests.conftest import tiny_config
from worker.transports.p2p import P2PTransport

TOKEN = "gossip-s3cret"
GOSSIP_STEPS = 2


def params(seed: int) -> Params:
    gen = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(4, 3, generator=gen), "b": torch.randn(3, generator=gen)}


@contextmanager
def gossip_run(**cluster: Any) -> Iterator[tuple[RendezvousServer, list[P2PTransport], list[Params]]]:
    """A 2-worker gossip run: the rendezvous, both peers enrolled and started (serving their models)."""
    cfg = tiny_config(name="gossip-hostile", protocol={"kind": "gossip", "inner_steps": 5,
                                                       "gossip_steps": GOSSIP_STEPS},
                      cluster={"workers": 2, "token": TOKEN, "heartbeat_interval_s": 0.5, **cluster})
    server = RendezvousServer(cfg).start()
    nodes = [P2PTransport(server.address, TOKEN, retry_for_s=60.0) for _ in range(2)]
    models = [params(i) for i in range(2)]
    try:
        for node in nodes:
            node.enroll()
        for node, model in zip(nodes, models, strict=True):
            node.start(model)
        yield server, nodes, models
    finally:
        for node in nodes:
            node.close()
        server.stop(0)


def rendezvous_fingerprint(server: RendezvousServer) -> tuple[Any, ...]:
    """What no refused call may change at the rendezvous: its member table (all but the clock of the last
    call), the rows written, the next round and the attested base."""
    rdv = server.rendezvous
    members = sorted((p.worker_id, p.index, p.hostname, p.address, p.alive, p.round, p.reported, p.step, p.loss,
                      p.eval_loss, p.final_eval_loss, p.bytes_sent, p.bytes_received, p.tokens, p.steps)
                     for p in rdv.members_copy())
    return members, rdv.next_row, len(rdv.rows), rdv.base_digest, sorted(server.servicer.bytes_by_worker())


def peer_fingerprint(node: P2PTransport, model: Params) -> tuple[Any, ...]:
    """What no refused stream may change at a peer: its replica's digest, its step floor (round) and the
    messages waiting in its inbox."""
    digest = hashlib.sha256()
    for name in sorted(model):
        digest.update(name.encode())
        digest.update(model[name].contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest(), node.inbox.floor, node.inbox.pending()


def gossip_messages(sender: P2PTransport, step: int = 0, token: str | None = None, run_id: str | None = None,
                    model: Params | None = None) -> list[pb.PeerChunk]:
    """A Gossip stream from `sender` (header and chunks), as protobuf, with the envelope fields given (the
    token: by default the run's peer token, as the sender's own messages carry)."""
    payloads = {n: dense(t) for n, t in (model or params(sender.index)).items()}
    env = m.Envelope(sender.run_id if run_id is None else run_id, sender.worker_id, step // GOSSIP_STEPS,
                     PROTOCOL_VERSION, sender.peer_token if token is None else token)
    header = m.PeerHeader(envelope=env, step=step, sender=sender.index, weight=1.0, num_entries=len(payloads),
                          total_bytes=sum(p.nbytes() for p in payloads.values()))
    return list(serde.peer_stream(header, payloads))
