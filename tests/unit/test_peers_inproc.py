"""The in-process peer transport: a message is checked against the receiver's own model and step on
arrival; a bad one is refused with a clear reason, the sender's handle says False, and it is never
delivered. Bytes are the payloads', counted once delivered."""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator

import pytest
import torch

from compression.payload import dense
from coordinator.rendezvous import Rendezvous
from protocols.config import RunConfig
from protocols.replica import Params
from tests.conftest import tiny_config
from worker.transports.peers import PeerMessage
from worker.transports.peers_inproc import InprocPeers, InprocPeerTransport


def _cfg(**protocol: object) -> RunConfig:
    return tiny_config(protocol={"kind": "gossip", "topology": "ring", "inner_steps": 5, "gossip_steps": 2,
                                 "peer_timeout_s": 0.2, **protocol}, cluster={"workers": 3})


def _params(rows: int = 4) -> Params:
    return {"w": torch.ones(rows, 3), "b": torch.zeros(3)}


def _message(step: int, sender: int = 1, params: Params | None = None, round_: int | None = None) -> PeerMessage:
    payloads = {n: dense(t) for n, t in (params or _params()).items()}
    return PeerMessage(step // 2 if round_ is None else round_, step, sender, payloads)


def _hub(cfg: RunConfig | None = None) -> tuple[InprocPeers, list[InprocPeerTransport]]:
    cfg = cfg or _cfg()
    hub = InprocPeers(Rendezvous(cfg), cfg)
    nodes = [hub.transport() for _ in range(3)]
    for node in nodes:
        node.start(_params())
    return hub, nodes


def test_a_valid_message_is_delivered_and_counted_both_ways() -> None:
    _, nodes = _hub()
    assert [n.index for n in nodes] == [0, 1, 2] and nodes[0].workers == 3
    message = _message(0)
    assert nodes[1].send(0, message).result() is True
    got = nodes[0].receive(0, {1, 2}, timeout_s=0.05)  # node 2 sent nothing: left out after the timeout
    assert list(got) == [1] and got[1] is message
    assert nodes[1].bytes_sent == nodes[0].bytes_received == message.nbytes() == (12 + 3) * 4


@pytest.mark.parametrize(
    ("message", "match"),
    [
        (_message(0, params=_params(rows=5)), r"message from node 1: tensor 'w' has shape \[5, 3\], expected \[4, 3\]"),
        (_message(0, params={"w": torch.ones(4, 3)}), r"lacks tensor\(s\) \['b'\]"),
        (_message(0, params={**_params(), "extra": torch.ones(1)}), r"unknown tensor name\(s\) \['extra'\]"),
        (_message(0, params={"w": torch.ones(4, 3, dtype=torch.float64), "b": torch.zeros(3)}), "has dtype"),
        (_message(0, params={"w": torch.full((4, 3), float("nan")), "b": torch.zeros(3)}), "NaN or Inf"),
        (_message(0, sender=0), "unknown sender index 0"),
        (_message(0, round_=1), "gossip step 0 belongs to round 0, node 1 says 1"),
        (_message(9), r"step too far ahead"),
    ],
)
def test_a_bad_message_is_refused_at_the_senders_handle_and_never_delivered(message: PeerMessage, match: str) -> None:
    hub, nodes = _hub()
    with _warnings("worker.transports.peers_inproc") as logged:
        assert nodes[1].send(0, message).result() is False
    assert len(hub.refusals) == 1 and re.search(match, hub.refusals[0]), hub.refusals
    assert any(re.search(match, text) for text in logged), logged
    assert nodes[0].bytes_received == 0 and nodes[0].receive(0, {1}, timeout_s=0.0) == {}


@contextlib.contextmanager
def _warnings(name: str) -> Iterator[list[str]]:
    """The messages logged at WARNING and up on logger `name` (a handler of its own: whatever another test
    did to the root logger's configuration, e.g. Ray's, cannot hide them)."""
    logger, texts = logging.getLogger(name), []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: texts.append(record.getMessage())  # type: ignore[method-assign]
    disabled, logger.disabled = logger.disabled, False
    logger.addHandler(handler)
    try:
        yield texts
    finally:
        logger.removeHandler(handler)
        logger.disabled = disabled


def test_a_message_for_a_step_the_receiver_closed_is_refused_as_stale() -> None:
    hub, nodes = _hub()
    assert nodes[0].receive(0, {1}, timeout_s=0.0) == {}  # closes step 0 without node 1
    assert nodes[1].send(0, _message(0)).result() is False
    assert "stale step" in hub.refusals[-1]
    assert nodes[1].send(0, _message(1)).result() is True  # the next step is open
    assert nodes[1].send(0, _message(1)).result() is False and "already sent" in hub.refusals[-1]


def test_choco_runs_accept_only_the_runs_codec() -> None:
    cfg = _cfg(scheme="choco", choco={"codec": "topk", "density": 0.5})
    hub, nodes = _hub(cfg)
    assert nodes[1].send(0, _message(0)).result() is False  # a dense model where a top-k difference belongs
    assert "encoded with ['dense']; this run's gossip messages use ['topk']" in hub.refusals[0]


def test_a_send_to_a_node_that_never_started_or_left_is_refused() -> None:
    cfg = _cfg()
    rendezvous = Rendezvous(cfg)
    hub = InprocPeers(rendezvous, cfg)
    nodes = [hub.transport() for _ in range(3)]
    nodes[1].start(_params())
    assert nodes[1].send(0, _message(0)).result() is False and "did not start within 0.2 s" in hub.refusals[0]
    nodes[0].start(_params())
    nodes[0].close()
    assert nodes[1].send(0, _message(0)).result() is False and "node 0 has left the run" in hub.refusals[1]
    assert not rendezvous.members_copy()[0].alive
