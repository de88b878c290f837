"""The join handshake (protocols/handshake.py): the version and config hash a worker sends, judged."""

from __future__ import annotations

import pytest

from coordinator.errors import Code, Rejected
from coordinator.state import CoordinatorState
from protocols.config import PROTOCOL_VERSION
from protocols.handshake import LOWBAND_VERSION, config_hash, handshake_problem
from protocols.registry import build_protocol
from tests.conftest import tiny_config


def test_the_config_hash_ignores_operational_fields_and_sees_every_other() -> None:
    base = tiny_config()
    assert config_hash(base) == config_hash(tiny_config(name="other", cluster={
        "workers": 2, "round_deadline_s": 7, "heartbeat_interval_s": 0.5, "heartbeat_timeout_s": 9, "token": "t"}))
    assert config_hash(base) != config_hash(tiny_config(train={"steps": 10, "lr": 2e-2, "warmup_steps": 2,
                                                               "eval_batches": 2, "eval_every_steps": 5}))
    assert config_hash(base) != config_hash(tiny_config(protocol={"kind": "diloco", "inner_steps": 4}))
    assert len(config_hash(base)) == 16


def test_a_handshake_problem_names_what_differs_and_leaves_unsent_fields_alone() -> None:
    run = config_hash(tiny_config())
    assert handshake_problem("", "", run) is None  # a first join from a hand-made client: nothing to judge
    assert handshake_problem(LOWBAND_VERSION, run, run) is None
    version = handshake_problem("0.0.0-elsewhere", "", run)
    assert version is not None and "0.0.0-elsewhere" in version and LOWBAND_VERSION in version
    config = handshake_problem(LOWBAND_VERSION, "feedfacefeedface", run)
    assert config is not None and "feedfacefeedface" in config and run in config and "restart the worker" in config


@pytest.mark.parametrize("version,worker_hash", [("0.0.0-elsewhere", ""), (LOWBAND_VERSION, "feedfacefeedface")])
def test_the_coordinator_refuses_a_mismatched_join_and_adds_no_member(version: str, worker_hash: str) -> None:
    cfg = tiny_config()
    state = CoordinatorState(cfg, build_protocol(cfg))
    with pytest.raises(Rejected) as info:
        state.join("host", "", PROTOCOL_VERSION, "w9", version, worker_hash)
    assert info.value.code is Code.FAILED_PRECONDITION
    assert state.members == {}
    member = state.join("host", "", PROTOCOL_VERSION, "w9", LOWBAND_VERSION, state.config_hash)
    assert member.worker_id == "w9"
