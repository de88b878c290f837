"""The gossip wire: Peer streams (a PeerHeader, then tensor chunks) through real serialized bytes, and the
malformed gossip messages serde refuses. (Every message's plain round trip is in test_wire_messages.py.)"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from compression.payload import Payload, dense
from compression.topk import ChunkedTopK
from protocols.wire import lowband_pb2 as pb
from protocols.wire import messages as m
from protocols.wire.serde import from_pb, peer_stream, read_peer, to_pb

ENV = m.Envelope(run_id="run1", worker_id="w2", round=3, protocol_version=1, token="secret")


def header_for(entries: dict[str, Payload], weight: float = 1.0, step: int = 7) -> m.PeerHeader:
    return m.PeerHeader(envelope=ENV, step=step, sender=2, weight=weight, num_entries=len(entries),
                        total_bytes=sum(p.nbytes() for p in entries.values()))


def over_the_wire(msgs: Iterator[Any]) -> list[pb.PeerChunk]:
    return [pb.PeerChunk.FromString(msg.SerializeToString()) for msg in msgs]


def test_a_peer_message_streams_in_chunks_and_arrives_bit_identical() -> None:
    gen = torch.Generator().manual_seed(0)
    model = {"emb.weight": torch.randn(300, 64, generator=gen), "ln.bias": torch.randn(64, generator=gen),
             "head.weight": torch.randn(64, 300, generator=gen).to(torch.bfloat16)}
    entries = {name: dense(t) for name, t in model.items()}
    entries["delta"] = ChunkedTopK(density=0.1).compress(torch.randn(5000, generator=gen))
    chunk_bytes = 16 << 10
    wire = over_the_wire(peer_stream(header_for(entries, weight=0.25), entries, chunk_bytes))

    assert wire[0].WhichOneof("body") == "header"
    chunks = [msg.chunk for msg in wire[1:]]
    assert all(len(c.data) <= chunk_bytes for c in chunks)
    assert len(chunks) > sum(p.nbytes() for p in entries.values()) // chunk_bytes  # really cut into many
    header, got = read_peer(wire, max_total_bytes=1 << 30)
    assert header == header_for(entries, weight=0.25)
    assert list(got) == list(entries)
    for name, payload in entries.items():
        assert (got[name].codec, got[name].shape, got[name].dtype) == (payload.codec, payload.shape, payload.dtype)
        assert got[name].meta == payload.meta
        for cname, t in payload.tensors.items():
            assert torch.equal(got[name].tensors[cname].view(torch.uint8), t.contiguous().view(torch.uint8))


@pytest.mark.parametrize("weight", [0.0, -1.0, math.nan, math.inf])
def test_a_peer_header_with_a_weight_that_is_not_finite_and_positive_is_refused(weight: float) -> None:
    entries = {"w": dense(torch.ones(3))}
    wire = over_the_wire(peer_stream(header_for(entries, weight=weight), entries))
    with pytest.raises(m.WireError, match=r"PeerHeader\.weight must be finite and positive"):
        read_peer(wire, max_total_bytes=1 << 20)


def test_a_peer_stream_that_does_not_start_with_its_header_is_refused() -> None:
    entries = {"w": dense(torch.ones(3))}
    wire = over_the_wire(peer_stream(header_for(entries), entries))
    with pytest.raises(m.WireError, match=r"must start with a PeerHeader, got a chunk message"):
        read_peer(wire[1:], max_total_bytes=1 << 20)
    with pytest.raises(m.WireError, match=r"every message must be a chunk; got header"):
        read_peer([wire[0], wire[0], *wire[1:]], max_total_bytes=1 << 20)


def test_a_peer_stream_whose_chunks_disagree_with_its_header_is_refused() -> None:
    entries = {"w": dense(torch.ones(1000))}
    good = header_for(entries)
    lying = m.PeerHeader(**{**good.__dict__, "total_bytes": good.total_bytes - 4})
    chunks = over_the_wire(peer_stream(good, entries))[1:]
    with pytest.raises(m.WireError, match=r"entry 'w' brings the stream to 4000 bytes, over the limit of 3996"):
        read_peer([pb.PeerChunk(header=to_pb(lying)), *chunks], max_total_bytes=1 << 20)


def test_a_refusal_from_the_header_reads_no_chunk() -> None:
    """`on_header` runs before any payload is read: a refused sender's tensors are never buffered."""
    entries = {"w": dense(torch.ones(1000))}
    consumed: list[str] = []

    def stream() -> Iterator[pb.PeerChunk]:
        for msg in over_the_wire(peer_stream(header_for(entries), entries, chunk_bytes=512)):
            consumed.append(msg.WhichOneof("body"))
            yield msg

    def refuse(header: m.PeerHeader) -> None:
        raise m.WireError(f"no thanks, node {header.sender}")

    with pytest.raises(m.WireError, match="no thanks, node 2"):
        read_peer(stream(), max_total_bytes=1 << 20, on_header=refuse)
    assert consumed == ["header"]


def test_a_peer_stream_over_the_byte_limit_is_refused_before_its_chunks() -> None:
    entries = {"w": dense(torch.ones(1000))}
    with pytest.raises(m.WireError, match=r"declares 4000 bytes, over the limit of 3999"):
        read_peer(over_the_wire(peer_stream(header_for(entries), entries)), max_total_bytes=3999)


def test_a_report_with_a_metric_that_is_not_finite_is_refused() -> None:
    wire = to_pb(m.ReportRequest(envelope=ENV, metrics={"train_loss": math.nan}))
    with pytest.raises(m.WireError, match=r"ReportRequest\.metrics must be finite, got \{'train_loss': nan\}"):
        from_pb(wire, m.ReportRequest)


def test_a_rendezvous_request_without_its_envelope_is_refused() -> None:
    for cls in (pb.RosterRequest, pb.ReportRequest, pb.EnrollRequest):
        with pytest.raises(m.WireError, match=rf"{cls.DESCRIPTOR.name}\.envelope is missing"):
            from_pb(cls())


def test_the_gossip_services_are_declared_as_the_transport_uses_them() -> None:
    services = pb.DESCRIPTOR.services_by_name
    gossip = services["Peer"].methods_by_name["Gossip"]
    assert (gossip.input_type.name, gossip.output_type.name) == ("PeerChunk", "PeerAck")
    assert gossip.client_streaming and not gossip.server_streaming
    assert set(services["Rendezvous"].methods_by_name) == {"Enroll", "Roster", "Report", "Heartbeat", "Leave",
                                                            "AttestBase"}
