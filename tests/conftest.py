"""Shared fixtures: a tiny run config that trains in seconds on one CPU thread."""

from __future__ import annotations

import os
from typing import Any

import pytest
from hypothesis import settings

from protocols.config import RunConfig, parse_config

# Property tests draw the same examples on every run (CI included): a failure reproduces, and a green
# suite does not turn red by drawing a new corner case. Explore with HYPOTHESIS_PROFILE=explore.
settings.register_profile("ci", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Ray must never phone home or prompt in tests.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Every test rendezvous is on 127.0.0.1: keep gloo off whatever address the hostname resolves to.
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")


def tiny_config(**overrides: Any) -> RunConfig:
    """A 2-worker DiLoCo run of 2 rounds of 5 inner steps on a tiny GPT and a 60k-character corpus."""
    data: dict[str, Any] = {
        "name": "tiny",
        "model": {"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 32},
        "data": {"batch_size": 8, "max_chars": 60_000},
        "train": {"steps": 10, "lr": 1e-2, "warmup_steps": 2, "eval_batches": 2, "eval_every_steps": 5},
        "protocol": {"kind": "diloco", "inner_steps": 5},
        "cluster": {"workers": 2, "round_deadline_s": 60, "heartbeat_interval_s": 0.5},
    }
    for key, value in overrides.items():
        section, _, field = key.partition("__")
        if field:
            data.setdefault(section, {})[field] = value
        else:
            data[section] = value
    return parse_config(data)


@pytest.fixture
def tiny() -> RunConfig:
    return tiny_config()
