"""The loopback helpers shared by the DDP baseline and the all-gather transport."""

from __future__ import annotations

import os
import socket

import pytest

from worker.spawn import free_loopback_port, pin_gloo_to_loopback


@pytest.mark.parametrize("init_method", ["tcp://127.0.0.1:1234", "tcp://localhost:1234"])
def test_a_loopback_rendezvous_pins_gloo_to_lo(monkeypatch: pytest.MonkeyPatch, init_method: str) -> None:
    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    pin_gloo_to_loopback(init_method)
    assert os.environ["GLOO_SOCKET_IFNAME"] == "lo"


def test_another_rendezvous_or_an_explicit_choice_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    pin_gloo_to_loopback("tcp://10.0.0.7:1234")
    assert "GLOO_SOCKET_IFNAME" not in os.environ
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "eth1")
    pin_gloo_to_loopback("tcp://127.0.0.1:1234")
    assert os.environ["GLOO_SOCKET_IFNAME"] == "eth1"


def test_free_loopback_port_can_be_bound_again() -> None:
    port = free_loopback_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        assert s.getsockname()[1] == port
