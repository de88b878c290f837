"""The p2p gossip transport over real gRPC on loopback: four `P2PTransport`s and a `RendezvousServer`.

Models of several MB stream from peer to peer in chunks and arrive bit for bit; messages of another
architecture, another run, a closed or far-off step, or with NaNs are refused with a status that says what
was wrong and never reach the inbox; a peer that vanishes is skipped after the timeout without holding up the
others; and the rendezvous, which never sees a tensor, counts a few KB per worker while the peers move MBs.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch

from compression.payload import dense
from coordinator.rendezvous_server import RendezvousServer
from protocols.config import PROTOCOL_VERSION
from protocols.replica import Params
from protocols.wire import lowband_pb2_grpc, serde
from protocols.wire import messages as m
from tests.conftest import tiny_config
from worker.transports.p2p import P2PTransport
from worker.transports.peers import PeerMessage

TOKEN = "s3cret"
WORKERS = 4
GOSSIP_STEPS = 2  # two rounds of two gossip steps: steps 0..3


def model(seed: int) -> Params:
    """About 6 MB of float32: several 1 MiB chunks per message."""
    gen = torch.Generator().manual_seed(seed)
    return {"embed.weight": torch.randn(1024, 768, generator=gen), "head.weight": torch.randn(768, 1024, generator=gen),
            "ln.bias": torch.randn(768, generator=gen)}  # fmt: skip


def message(params: Params, step: int, sender: int) -> PeerMessage:
    return PeerMessage(round=step // GOSSIP_STEPS, step=step, sender=sender,
                       payloads={n: dense(t) for n, t in params.items()})


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[RendezvousServer, list[P2PTransport]]]:
    cfg = tiny_config(name="p2p", run_dir=str(tmp_path / "runs"),
                      protocol={"kind": "gossip", "inner_steps": 5, "gossip_steps": GOSSIP_STEPS},
                      cluster={"workers": WORKERS, "token": TOKEN, "heartbeat_interval_s": 0.5})
    server = RendezvousServer(cfg, run_dir=tmp_path / "runs" / "p2p").start()
    nodes = [P2PTransport(server.address, TOKEN, retry_for_s=30.0) for _ in range(WORKERS)]
    try:
        for node in nodes:
            node.enroll()
        assert [node.index for node in nodes] == list(range(WORKERS))
        yield server, nodes
    finally:
        for node in nodes:
            node.close()
        server.stop()


def start_all(nodes: list[P2PTransport]) -> None:
    for i, node in enumerate(nodes):
        roster = node.start(model(i))
        assert roster.workers == WORKERS and not roster.finished
        assert roster.addresses == {j: n.address for j, n in enumerate(nodes)}


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def test_models_of_several_megabytes_stream_between_peers_intact_and_skip_the_rendezvous(
    cluster: tuple[RendezvousServer, list[P2PTransport]],
) -> None:
    server, nodes = cluster
    # Node 3 starts last: node 2's first send finds it still building its model ("not ready") and is retried.
    for node in nodes[:3]:
        node.start(model(node.index))
    early = nodes[2].send(3, message(model(2), 0, 2))
    nodes[3].start(model(3))
    handles = [early] + [nodes[i].send((i + 1) % WORKERS, message(model(i), 0, i)) for i in (0, 1, 3)]
    for i, node in enumerate(nodes):
        sender = (i - 1) % WORKERS
        got = node.receive(0, {sender}, timeout_s=120.0)
        assert list(got) == [sender]
        assert (got[sender].step, got[sender].round, got[sender].weight) == (0, 0, 1.0)
        for name, t in model(sender).items():
            assert torch.equal(bits(got[sender].payloads[name].tensors["values"]), bits(t))
    assert [h.result(timeout=60) for h in handles] == [True] * WORKERS

    nbytes = sum(t.numel() * t.element_size() for t in model(0).values())
    assert nbytes > 6_000_000
    for node in nodes:
        # What crossed the wire: the tensors plus framing (headers, chunk specs), each way. Node 2's refused
        # attempts to reach node 3 before it started count too (what gRPC took of them before the refusal).
        assert nbytes < node.bytes_sent
        assert node.index == 2 or node.bytes_sent < nbytes + 100_000
        assert nbytes < node.bytes_received < nbytes + 100_000
    counted = server.summary()["rendezvous_bytes"]
    assert sorted(counted) == ["w0", "w1", "w2", "w3"]
    for worker in counted.values():
        assert 0 < worker["bytes_total"] < 8_000  # enroll, roster, heartbeats: a few KB, no tensor


def raw_send(address: str, header: m.PeerHeader, params: Params) -> grpc.RpcError:
    """Send one Gossip stream straight from a stub; the error status it gets."""
    with grpc.insecure_channel(address, options=m.GRPC_OPTIONS) as channel:
        stub = lowband_pb2_grpc.PeerStub(channel)
        entries = {n: dense(t) for n, t in params.items()}
        with pytest.raises(grpc.RpcError) as err:
            stub.Gossip(serde.peer_stream(header, entries), timeout=60)
        return err.value  # type: ignore[return-value]


def test_bad_messages_are_refused_with_a_status_that_says_why_and_never_delivered(
    cluster: tuple[RendezvousServer, list[P2PTransport]],
) -> None:
    _, nodes = cluster
    start_all(nodes)
    receiver, run_id = nodes[1], nodes[0].run_id
    nodes[1].receive(0, {0}, timeout_s=0.0)  # step 0 is closed on node 1 from now on

    def header(step: int = 2, sender: int = 0, run: str = run_id, token: str = nodes[0].peer_token) -> m.PeerHeader:
        env = m.Envelope(run, "w0", step // GOSSIP_STEPS, PROTOCOL_VERSION, token)
        entries = model(0)
        return m.PeerHeader(env, step, sender, 1.0, len(entries), sum(t.nbytes for t in entries.values()))

    good = model(0)
    transposed = {**good, "embed.weight": good["embed.weight"].t().contiguous()}
    poisoned = {**good, "ln.bias": good["ln.bias"].clone().index_fill_(0, torch.tensor([5]), float("nan"))}
    cases = [
        (header(), transposed, grpc.StatusCode.INVALID_ARGUMENT,
         "tensor 'embed.weight' has shape [768, 1024], expected [1024, 768]"),
        (header(), poisoned, grpc.StatusCode.INVALID_ARGUMENT, "tensor 'ln.bias' contains NaN or Inf"),
        (header(step=0), good, grpc.StatusCode.FAILED_PRECONDITION,
         "stale step: message from node 0 is for gossip step 0, this node is at step 1"),
        (header(step=3, sender=7), good, grpc.StatusCode.INVALID_ARGUMENT, "unknown sender index 7"),
        (header(sender=1), good, grpc.StatusCode.INVALID_ARGUMENT, "unknown sender index 1"),  # itself
        (header(run="another-run"), good, grpc.StatusCode.FAILED_PRECONDITION, "wrong run id 'another-run'"),
        (header(token="guess"), good, grpc.StatusCode.UNAUTHENTICATED, "bad token"),
        (header(step=4), good, grpc.StatusCode.FAILED_PRECONDITION, "gossip step 4 is past the run's last step 3"),
    ]
    for hdr, params, code, says in cases:
        err = raw_send(receiver.address, hdr, params)
        assert err.code() is code, (says, err.details())
        assert says in (err.details() or ""), err.details()
    assert receiver.inbox.pending() == []

    # Through the transport: the send is False and the reason kept (and logged), nothing of it reaches node 1.
    assert nodes[0].send(1, message(transposed, 2, 0)).result(timeout=60) is False
    [why] = nodes[0].undelivered
    assert "INVALID_ARGUMENT: message from w0 (node 0): tensor 'embed.weight' has shape [768, 1024]" in why
    assert receiver.receive(2, {0}, timeout_s=0.5) == {}
    # ... and the receiver still takes a good message afterwards.
    assert nodes[0].send(1, message(good, 3, 0)).result(timeout=60) is True
    assert list(receiver.receive(3, {0}, timeout_s=60.0)) == [0]


def test_a_vanished_peer_is_skipped_after_the_timeout_and_blocks_no_one(
    cluster: tuple[RendezvousServer, list[P2PTransport]],
) -> None:
    _, nodes = cluster
    start_all(nodes)
    everyone = set(range(WORKERS))
    # Step 0: everyone sends to everyone, so every node has reached every other once.
    sent = [nodes[i].send(j, message(model(i), 0, i)) for i in everyone for j in everyone - {i}]
    for i, node in enumerate(nodes):
        assert set(node.receive(0, everyone - {i}, timeout_s=120.0)) == everyone - {i}
    assert all(h.result(timeout=60) for h in sent)

    nodes[3].server.stop(grace=None).wait()  # node 3 vanishes without leaving: its process died
    survivors = everyone - {3}
    sent = {(i, j): nodes[i].send(j, message(model(i), 1, i)) for i in survivors for j in everyone - {i}}
    for (_, j), handle in sent.items():
        assert handle.result(timeout=60) is (j != 3)  # a send to the vanished peer is False, not an error
    for i in survivors:  # every survivor's messages are filed by now: only node 3's is waited for, 1 s
        got = nodes[i].receive(1, everyone - {i}, timeout_s=1.0)
        assert set(got) == survivors - {i}
