"""A round's aggregate is encoded once and shared by every pull of it (coordinator/servicer.py
`EncodedAggregates`): two members pull the same round from a real coordinator on loopback, and both receive
the aggregate the coordinator closed, which was encoded once."""

from __future__ import annotations

import torch

from compression.payload import dense
from protocols.base import Update
from tests.integration.hostile import UPDATE, running


def test_every_pull_of_a_round_shares_one_encoding_of_its_aggregate() -> None:
    with running() as (server, members):
        for k, member in enumerate(members):
            update = Update({n: dense((k + 1) * t) for n, t in UPDATE.items()})
            member.push(0, update, {"tokens": 10.0})
        assert members[0].wait_round(0).round == 1
        pulled = [member.pull_aggregate(0) for member in members]
        pulled.append(members[0].pull_aggregate(0))  # and again
        assert server.servicer.aggregates.encoded == 1
        closed, digest_after = server.state.aggregates[0]
        for header, aggregate in pulled:
            assert header.state_hash == digest_after and aggregate.round == 0
            assert aggregate.payloads.keys() == closed.payloads.keys()
            for name, payload in closed.payloads.items():
                for component, tensor in payload.tensors.items():
                    assert torch.equal(aggregate.payloads[name].tensors[component], tensor)
