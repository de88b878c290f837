"""The byte split on both ends of a real gRPC connection: a hand-driven worker (a `CoordinatorClient`, every call
made by the test) against a `CoordinatorServer` on loopback. Protocol bytes are exactly the update streams the
coordinator acknowledged receiving, however many heartbeats go between them; each kind is counted alike by both
ends; and protocol + control + state = total, on both ends and in the run summary."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
import torch

from compression.payload import dense
from coordinator.server import CoordinatorServer
from coordinator.traffic import TRAFFIC_KEYS, traffic_of
from deploy.status import fetch_status
from protocols.base import Update
from tests.conftest import tiny_config
from worker.client import CoordinatorClient
from worker.traffic import Traffic

ROUNDS = 3
HEARTBEATS_PER_ROUND = 7


@pytest.fixture
def server() -> Iterator[CoordinatorServer]:
    cfg = tiny_config(train={"steps": 5 * ROUNDS, "lr": 1e-2}, cluster={"workers": 1,
                                                                                "heartbeat_interval_s": 60,
                                                                                "heartbeat_timeout_s": 600})
    running = CoordinatorServer(cfg, bind="127.0.0.1:0").start()
    yield running
    running.stop(0)


def test_protocol_bytes_are_the_update_streams_and_every_split_reconciles(server: CoordinatorServer) -> None:
    client = CoordinatorClient(server.address, retry_for_s=10.0)
    client.join("test-host")
    assert client.offer_state({"w": torch.zeros(256), "b": torch.zeros(8)})
    acknowledged = 0  # update bytes the coordinator said it received, push by push
    for round_ in range(ROUNDS):
        info = client.wait_round(round_ - 1)
        assert info.round == round_
        for step in range(HEARTBEATS_PER_ROUND):
            client.heartbeat(step, 2.0, None)
        update = Update(payloads={"w": dense(torch.full((256,), 0.01)), "b": dense(torch.ones(8))}, weight=1.0)
        reply = client.push(round_, update, {"train_loss": 2.0, "tokens": 64.0})
        acknowledged += reply.bytes_received
        client.pull_aggregate(round_)
    # Neither a refused call nor an operator's Status counts against the worker.
    counted = traffic_of(server.state.members_copy()[0])
    with pytest.raises(grpc.RpcError) as refused:
        client.heartbeat(99, -1.0, None)  # a negative loss: INVALID_ARGUMENT
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert len(fetch_status(server.address).workers) == 1
    assert traffic_of(server.state.members_copy()[0]) == counted
    client.traffic = Traffic(**counted)  # the client counted the refused request it sent; start again from equal
    client.leave()

    [member] = server.state.members_copy()
    worker_side, coordinator_side = client.traffic.as_dict(), traffic_of(member)
    # Heartbeats went between the pushes; none of them is protocol traffic.
    assert worker_side["protocol_sent"] == acknowledged > 0
    assert worker_side == coordinator_side  # every call completed: both ends counted the same bytes by kind
    assert worker_side["control_sent"] > ROUNDS * HEARTBEATS_PER_ROUND * 10  # each heartbeat is > 10 bytes
    assert worker_side["state_sent"] > 264 * 4 and worker_side["state_received"] == 0
    assert worker_side["protocol_received"] > 0
    assert client.bytes_sent == sum(v for k, v in worker_side.items() if k.endswith("_sent"))
    assert client.bytes_received == sum(v for k, v in worker_side.items() if k.endswith("_received"))
    assert member.bytes_sent == client.bytes_sent and member.bytes_received == client.bytes_received

    summary = server.summary()
    split = summary["traffic_per_worker"]
    assert set(split) == set(TRAFFIC_KEYS)
    assert sum(split[f"{k}_sent"] for k in ("protocol", "control", "state")) == summary["bytes_sent_per_worker"]
    assert (sum(split[f"{k}_received"] for k in ("protocol", "control", "state"))
            == summary["bytes_received_per_worker"])
    assert summary["workers"][member.worker_id]["traffic"] == coordinator_side
    client.close()
