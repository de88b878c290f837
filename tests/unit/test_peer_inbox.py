"""A gossip node's inbox: the step window, duplicates, and `take` waiting for what it wants and no longer."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from compression.payload import dense
from protocols.refusals import Code, Rejected
from worker.transports.peer_inbox import PeerInbox
from worker.transports.peers import PeerMessage


def msg(step: int, sender: int) -> PeerMessage:
    return PeerMessage(round=step, step=step, sender=sender, payloads={"w": dense(torch.full((2,), float(sender)))})


def test_messages_wait_for_their_step_and_are_taken_by_sender() -> None:
    inbox = PeerInbox(max_ahead=4)
    for m in (msg(0, 1), msg(0, 2), msg(1, 1)):
        inbox.put(m)
    got = inbox.take(0, {1, 2}, timeout_s=0.0)
    assert sorted(got) == [1, 2] and got[2].payloads["w"].tensors["values"].tolist() == [2.0, 2.0]
    assert inbox.pending() == [(1, 1)]  # the faster neighbour's next step is kept


def test_take_returns_what_came_within_the_timeout() -> None:
    inbox = PeerInbox(max_ahead=4)
    inbox.put(msg(0, 1))
    started = time.monotonic()
    got = inbox.take(0, {1, 3}, timeout_s=0.2)
    assert list(got) == [1]
    assert time.monotonic() - started >= 0.2  # it did wait for node 3 ...
    assert inbox.floor == 1  # ... and step 0 is now closed


def test_take_wakes_as_soon_as_the_last_sender_arrives() -> None:
    inbox = PeerInbox(max_ahead=4)
    threading.Timer(0.05, inbox.put, args=(msg(0, 1),)).start()
    started = time.monotonic()
    assert list(inbox.take(0, {1}, timeout_s=30.0)) == [1]
    assert time.monotonic() - started < 10.0  # woken by the put, not by the 30 s timeout


def test_a_message_for_a_closed_step_is_refused_as_stale() -> None:
    inbox = PeerInbox(max_ahead=4)
    inbox.take(2, {1}, timeout_s=0.0)
    stale = r"stale step: message from node 1 is for gossip step 2, this node is at step 3"
    with pytest.raises(Rejected, match=stale) as err:
        inbox.put(msg(2, 1))
    assert err.value.code is Code.FAILED_PRECONDITION
    assert inbox.pending() == []


def test_a_message_too_far_ahead_or_twice_is_refused() -> None:
    inbox = PeerInbox(max_ahead=2)
    inbox.put(msg(2, 1))
    with pytest.raises(Rejected, match=r"step too far ahead: .* step 3, this node accepts steps 0\.\.2") as err:
        inbox.admit(3, 1)
    assert err.value.code is Code.FAILED_PRECONDITION
    with pytest.raises(Rejected, match=r"node 1 already sent its message for gossip step 2") as err:
        inbox.put(msg(2, 1))
    assert err.value.code is Code.ALREADY_EXISTS
    assert inbox.pending() == [(2, 1)]


def test_older_steps_are_dropped_when_a_later_one_is_taken() -> None:
    inbox = PeerInbox(max_ahead=4)
    inbox.put(msg(0, 1))
    inbox.put(msg(1, 2))
    assert list(inbox.take(1, {2}, timeout_s=0.0)) == [2]
    assert inbox.pending() == []  # node 1's step-0 message was never asked for: gone, not kept forever
