"""Crash recovery without processes: what a checkpoint holds, how `--resume` continues the same run, what it
refuses (one line, nothing written), the token kept out of the run directory, and the member limit.

The coordinator is driven by hand (`CoordinatorRun` with a run directory, no server); the CLI refusals go
through `deploy.cli.main`, which refuses before it binds anything.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from compression.payload import dense
from coordinator.checkpoint import load_checkpoint, state_digest
from coordinator.errors import Code, Rejected
from coordinator.run import CoordinatorRun
from coordinator.state import Phase
from deploy.cli import main
from protocols.base import Update
from protocols.config import PROTOCOL_VERSION, ConfigError, RunConfig, to_yaml
from tests.conftest import tiny_config

TOKEN = "s3cret-run-token"


def config(tmp: Path, **overrides: Any) -> RunConfig:
    # An int8 downlink under EF14: the coordinator keeps a residual, so there is error-feedback state to restore.
    protocol = {"kind": "diloco", "inner_steps": 5, "downlink": {"codec": "int8", "error_feedback": "ef14"}}
    return tiny_config(**{"run_dir": str(tmp / "runs"), "protocol": protocol, "train__steps": 15, **overrides})


def run_rounds(run: CoordinatorRun, ids: list[str], rounds: int, sessions: dict[str, str] | None = None) -> None:
    for _ in range(rounds):
        r = run.state.round
        for k, w in enumerate(ids):
            update = Update({"w": dense(torch.full((3, 2), 0.1 * (k + 1) + 0.01 * r))})
            run.state.submit(w, (sessions or {}).get(w, ""), r, update, {"tokens": 40.0, "train_loss": 2.0}, 100)
    run.recorder.flush()  # closed rounds are written off the state lock: wait until they are on disk


def started_run(tmp: Path, cfg: RunConfig, token: str = "",
                sessions: dict[str, str] | None = None) -> tuple[CoordinatorRun, list[str]]:
    """A run with every worker joined (presenting `token`; their sessions go into `sessions`) and its state."""
    run = CoordinatorRun(cfg, run_dir=tmp / "runs" / cfg.name)
    sessions = {} if sessions is None else sessions
    for _ in range(cfg.cluster.workers):
        member, session = run.state.join_session("host", token, PROTOCOL_VERSION)
        sessions[member.worker_id] = session
    ids = list(sessions)
    run.state.offer_initial_state(ids[0], sessions[ids[0]], {"w": dense(torch.ones(3, 2))})
    return run, ids


def printed(capsys: pytest.CaptureFixture[str]) -> str:
    """What the CLI printed, stdout and stderr together (its one-line errors may go to either)."""
    captured = capsys.readouterr()
    return captured.out + captured.err


def rows(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def round_numbers(run_dir: Path) -> list[int]:
    return [r["round"] for r in rows(run_dir) if r["event"] == "round"]


def test_the_checkpoint_holds_run_id_round_membership_and_the_closed_rounds_record(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    run, ids = started_run(tmp_path, cfg)
    run_rounds(run, ids, 1)
    ckpt = load_checkpoint(tmp_path / "runs" / "tiny" / "checkpoint.pt")
    assert ckpt["round"] == 1 and ckpt["run_id"] == run.state.run_id
    assert {w: m["index"] for w, m in ckpt["members"].items()} == {"w0": 0, "w1": 1}
    assert ckpt["members"]["w0"]["tokens"] == 40 and "alive" not in ckpt["members"]["w0"]
    assert ckpt["record"]["round"] == 0 and ckpt["downlink_state"] is not None
    assert not (tmp_path / "runs" / "tiny" / "checkpoint.pt.tmp").exists()


def test_resume_continues_the_same_run_with_bit_identical_state_and_appends_the_metrics(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    run, ids = started_run(tmp_path, cfg)
    run_rounds(run, ids, 2)
    run_dir = tmp_path / "runs" / "tiny"
    before = (run_dir / "metrics.jsonl").read_bytes()
    ckpt = load_checkpoint(run_dir / "checkpoint.pt")

    resumed = CoordinatorRun(cfg, run_dir=tmp_path / "elsewhere", resume=run_dir)
    state = resumed.state
    assert resumed.run_dir is not None and resumed.run_dir.path == run_dir  # the run's own directory
    assert state.run_id == run.state.run_id and state.round == 2 and state.phase is Phase.WAITING
    assert state.aggregator is not None
    assert state.aggregator.replica.digest() == ckpt["replica"].digest() == run.state.state_hash
    assert state_digest(state.aggregator.downlink_state) == state_digest(ckpt["downlink_state"])
    assert state_digest(state.aggregator.state) == state_digest(ckpt["aggregator_state"])
    assert resumed.resumed_from is not None
    assert resumed.resumed_from["downlink_state_digest"] == state_digest(run.state.aggregator.downlink_state)  # type: ignore[union-attr]
    # Members keep index and counters and are not alive until they call again.
    assert {(m.worker_id, m.index, m.alive, m.tokens) for m in state.members_copy()} == {
        ("w0", 0, False, 80), ("w1", 1, False, 80)}
    assert (run_dir / "metrics.jsonl").read_bytes().startswith(before)  # appended, never truncated
    with pytest.raises(Rejected) as err:  # a worker restarted without --name is told which ids to rejoin as
        state.join("host", "", PROTOCOL_VERSION)
    assert err.value.code is Code.RESOURCE_EXHAUSTED and "not alive: w0, w1" in err.value.message

    for w in ids:  # the workers call again under their ids: the round reopens where the checkpoint was
        state.heartbeat(w, "", 10, None, None)
    assert state.phase is Phase.TRAINING and state.round == 2
    run_rounds(resumed, ids, 1)
    assert state.phase is Phase.FINISHED
    assert round_numbers(run_dir) == [0, 1, 2]
    assert {r["run_id"] for r in rows(run_dir) if r["event"] in ("round", "start", "resume")} == {state.run_id}
    assert resumed.summary()["tokens"] == 3 * 2 * 40 and resumed.summary()["rounds"] == 3


def test_a_crash_between_checkpoint_and_metrics_row_is_mended_and_a_torn_row_dropped(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    run, ids = started_run(tmp_path, cfg)
    run_rounds(run, ids, 2)
    run_dir = tmp_path / "runs" / "tiny"
    lines = (run_dir / "metrics.jsonl").read_text().splitlines(keepends=True)
    # The crash came after round 1's checkpoint, while its row was being written: half a row is on disk.
    (run_dir / "metrics.jsonl").write_text("".join(lines[:-1]) + lines[-1][:20])
    CoordinatorRun(cfg, run_dir=run_dir, resume=run_dir)
    assert round_numbers(run_dir) == [0, 1]  # every round before the checkpoint exactly once
    assert all(line.startswith("{") for line in (run_dir / "metrics.jsonl").read_text().splitlines())


def test_an_early_push_to_a_resumed_coordinator_waiting_for_its_workers_is_early_not_fatal(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    run, ids = started_run(tmp_path, cfg)
    run_rounds(run, ids, 1)
    resumed = CoordinatorRun(cfg, resume=tmp_path / "runs" / "tiny" / "checkpoint.pt")
    with pytest.raises(Rejected) as err:
        resumed.state.check_push(ids[0], "", 1, initial_state=False)
    assert err.value.code is Code.FAILED_PRECONDITION and err.value.message.startswith("early round")


def test_resume_refuses_a_checkpoint_of_another_model_width_naming_the_field(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    run, ids = started_run(tmp_path, cfg)
    run_rounds(run, ids, 1)
    run_dir = tmp_path / "runs" / "tiny"
    before = (run_dir / "metrics.jsonl").read_bytes()
    wider = config(tmp_path, model={"n_layer": 1, "n_head": 2, "n_embd": 64, "block_size": 32})
    with pytest.raises(ConfigError) as err:
        CoordinatorRun(wider, run_dir=run_dir, resume=run_dir)
    message = str(err.value)
    assert "model.n_embd is 64 in the config but 32 in the checkpoint" in message and "\n" not in message
    other_protocol = config(tmp_path, protocol={"kind": "sparseloco", "inner_steps": 5})
    with pytest.raises(ConfigError, match=re.escape("protocol.kind is 'sparseloco' in the config but 'diloco'")):
        CoordinatorRun(other_protocol, run_dir=run_dir, resume=run_dir)
    assert (run_dir / "metrics.jsonl").read_bytes() == before


def test_a_missing_resume_path_is_one_line_and_leaves_the_metrics_untouched(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = config(tmp_path)
    run, ids = started_run(tmp_path, cfg)
    run_rounds(run, ids, 1)
    metrics = tmp_path / "runs" / "tiny" / "metrics.jsonl"
    before = metrics.read_bytes()
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(to_yaml(cfg))
    capsys.readouterr()
    typo = tmp_path / "runs" / "tinyy"
    assert main(["coordinator", str(recipe), "--bind", "127.0.0.1:0", "--resume", str(typo)]) == 2
    out = printed(capsys).strip()
    assert out == f"error: --resume {str(typo)!r}: no such file or directory"
    assert metrics.read_bytes() == before
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["coordinator", str(recipe), "--resume", str(empty)]) == 2
    assert "holds no checkpoint.pt" in printed(capsys)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    assert main(["coordinator", str(recipe), "--resume", str(corrupt)]) == 2
    assert "not a readable lowband checkpoint" in printed(capsys)
    assert metrics.read_bytes() == before


def test_resuming_a_finished_run_says_so_and_leaves_its_summary_intact(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = config(tmp_path)
    run, ids = started_run(tmp_path, cfg)
    run_rounds(run, ids, cfg.rounds)
    assert run.state.phase is Phase.FINISHED and run.run_dir is not None
    summary = run.run_dir.write_summary(run.summary())
    before = summary.read_bytes(), (run.run_dir.path / "metrics.jsonl").read_bytes()
    capsys.readouterr()
    assert main(["coordinator", "--resume", str(run.run_dir.path)]) == 2  # the checkpoint's own config
    out = printed(capsys)
    assert "already finished (3 of 3 rounds)" in out and "summary.json is left as it is" in out
    assert (summary.read_bytes(), (run.run_dir.path / "metrics.jsonl").read_bytes()) == before
    assert json.loads(summary.read_text())["tokens"] == 3 * 2 * 40


def test_the_token_never_reaches_the_run_directory_or_the_config_sent_to_workers(tmp_path: Path) -> None:
    cfg = config(tmp_path, cluster={"workers": 2, "token": TOKEN})
    sessions: dict[str, str] = {}
    run, ids = started_run(tmp_path, cfg, token=TOKEN, sessions=sessions)
    run_rounds(run, ids, 1, sessions)
    run_dir = tmp_path / "runs" / "tiny"
    secrets = [TOKEN, *sessions.values()]  # neither the run's secret nor a member's session credential
    for path in run_dir.iterdir():
        for secret in secrets:
            assert secret.encode() not in path.read_bytes(), path.name
    members = load_checkpoint(run_dir / "checkpoint.pt")["members"]
    assert {w: len(fields["session_digest"]) for w, fields in members.items()} == {w: 64 for w in ids}  # SHA-256
    assert TOKEN not in run.state.config_yaml  # what Join replies carry to every worker
    assert cfg.cluster.token == TOKEN  # the coordinator itself still checks it
    # Resuming asks for the token again: the run directory cannot supply it.
    with pytest.raises(ConfigError, match="was started with a token; give it again with --token"):
        CoordinatorRun(config(tmp_path), resume=run_dir)
    resumed = CoordinatorRun(cfg, resume=run_dir)
    for wrong in ("wrong", TOKEN, sessions[ids[1]]):  # after the handshake, not even the run's secret
        with pytest.raises(Rejected) as err:
            resumed.state.heartbeat(ids[0], wrong, 1, None, None)
        assert err.value.code is Code.UNAUTHENTICATED
    resumed.state.heartbeat(ids[0], sessions[ids[0]], 1, None, None)  # its session outlived the restart
    assert resumed.state.members[ids[0]].alive and not resumed.state.members[ids[1]].alive


def test_join_is_refused_past_cluster_workers_but_a_known_id_rejoins(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    run, ids = started_run(tmp_path, cfg)
    state = run.state
    with pytest.raises(Rejected) as err:
        state.join("host", "", PROTOCOL_VERSION)
    assert err.value.code is Code.RESOURCE_EXHAUSTED
    assert "cluster.workers = 2" in err.value.message and "--name" in err.value.message
    assert "not alive" not in err.value.message  # everyone is here: no id to suggest
    with pytest.raises(Rejected) as err:
        state.join("host", "", PROTOCOL_VERSION, "w7")
    assert err.value.code is Code.RESOURCE_EXHAUSTED
    assert sorted(state.members) == ids  # nothing was added
    again = state.join("other-host", "", PROTOCOL_VERSION, "w1")  # a restarted worker under its id
    assert (again.worker_id, again.index, again.joins) == ("w1", 1, 2)
    joins = [r for r in rows(tmp_path / "runs" / "tiny") if r["event"] == "join"]
    assert [(r["worker"], r["index"], r["joins"]) for r in joins] == [("w0", 0, 1), ("w1", 1, 1), ("w1", 1, 2)]


def test_a_resumed_run_starts_when_its_restored_workers_wait_for_it_without_beating(tmp_path: Path) -> None:
    """Restored members come back through any call: a worker waiting in WaitRound (`attend`, which spares its
    heartbeats) counts toward the resumed run's quorum as a heartbeat would."""
    cfg = config(tmp_path)
    run, ids = started_run(tmp_path, cfg)
    run_rounds(run, ids, 1)
    resumed = CoordinatorRun(cfg, resume=tmp_path / "runs" / "tiny" / "checkpoint.pt")
    assert resumed.state.phase is Phase.WAITING
    ends = [resumed.state.attend(w, "") for w in ids]
    assert resumed.state.phase is Phase.TRAINING and resumed.state.round == 1
    for end in ends:
        end()
