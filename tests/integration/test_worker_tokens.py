"""Issue 12, security: optional per-worker tokens over real gRPC. A coordinator given worker tokens admits
each named worker only with its own token and only under its own name; another worker's token, the run's
token, a guess or an unknown name are refused UNAUTHENTICATED with a message that names no token, and change
nothing. The tokens never reach the run directory nor the config sent to workers; a resume needs them again."""

from __future__ import annotations

import subprocess
from pathlib import Path

import grpc
import pytest
import torch

from compression.payload import dense
from coordinator.run import CoordinatorRun
from coordinator.server import CoordinatorServer
from deploy.tokens import read_worker_tokens
from protocols.base import Update
from protocols.config import PROTOCOL_VERSION, ConfigError
from protocols.wire import lowband_pb2_grpc, serde
from protocols.wire import messages as m
from tests.conftest import tiny_config
from tests.integration.hostile import fingerprint
from tests.integration.procs import LOWBAND, finish, start_coordinator, start_worker, write_recipe
from worker.client import CoordinatorClient

RUN_TOKEN = "the-runs-own-secret"
WORKER_TOKENS = {"w0": "w0-own-token-0123456789abcdef", "w1": "w1-own-token-fedcba9876543210"}
SECRETS = (RUN_TOKEN, *WORKER_TOKENS.values())


def _join(address: str, token: str, name: str) -> grpc.RpcError | m.JoinReply:
    env = m.Envelope(run_id="", worker_id=name, round=0, protocol_version=PROTOCOL_VERSION, token=token)
    with grpc.insecure_channel(address) as channel:
        try:
            reply = lowband_pb2_grpc.CoordinatorStub(channel).Join(
                serde.to_pb(m.JoinRequest(envelope=env, hostname="elsewhere")), timeout=30)
        except grpc.RpcError as err:
            return err
    return serde.from_pb(reply, m.JoinReply)


def test_each_worker_joins_only_with_its_own_token_under_its_own_name(tmp_path: Path) -> None:
    cfg = tiny_config(run_dir=str(tmp_path / "runs"), protocol={"kind": "diloco", "inner_steps": 5},
                      cluster={"workers": 2, "token": RUN_TOKEN, "heartbeat_interval_s": 0.5}, train__steps=10)
    run_dir = tmp_path / "runs" / "tiny"
    server = CoordinatorServer(cfg, run_dir=run_dir, worker_tokens=WORKER_TOKENS).start()
    w0 = CoordinatorClient(server.address, token=WORKER_TOKENS["w0"], retry_for_s=5)
    w1 = CoordinatorClient(server.address, token=WORKER_TOKENS["w1"], retry_for_s=5)
    try:
        joined = w0.join("host", "w0")
        assert (joined.worker_id, w0.session != "") == ("w0", True)
        assert not any(s in joined.config_yaml for s in SECRETS)  # the config sent to workers carries none
        before = fingerprint(server)
        for token, name, why in ((WORKER_TOKENS["w0"], "w1", "another worker's token"),
                                 (RUN_TOKEN, "w1", "the run's token admits no join once worker tokens are given"),
                                 ("a-guess-of-some-length", "w1", "a guess"),
                                 (WORKER_TOKENS["w1"], "w9", "an unknown name")):
            err = _join(server.address, token, name)
            assert isinstance(err, grpc.RpcError), why
            details = err.details() or ""
            assert err.code() == grpc.StatusCode.UNAUTHENTICATED and details.startswith("bad token"), (why, details)
            assert not any(s in details for s in SECRETS), (why, details)
        assert fingerprint(server) == before and sorted(server.state.members) == ["w0"]
        assert w1.join("host").worker_id == "w1"  # no name asked: its token's own
        # The run goes on as any other: a round with both.
        assert w0.offer_state({"w": torch.ones(3, 2)})
        for client, value in ((w0, 0.1), (w1, 0.2)):
            client.push(0, Update({"w": dense(torch.full((3, 2), value))}), {"tokens": 10.0})
        assert w0.wait_round(0).round == 1
        server.recorder.flush()
        for path in run_dir.iterdir():  # no token and no session in the run directory
            for secret in (*SECRETS, w0.session, w1.session):
                assert secret.encode() not in path.read_bytes(), path.name
    finally:
        w0.close()
        w1.close()
        server.stop(0)
    with pytest.raises(ConfigError, match="admitted workers by their own tokens; give the file again"):
        CoordinatorRun(cfg, run_dir=run_dir, resume=run_dir)
    resumed = CoordinatorRun(cfg, run_dir=run_dir, resume=run_dir, worker_tokens=WORKER_TOKENS)
    assert resumed.state.round == 1


def test_lowband_processes_run_with_worker_tokens_from_a_file(tmp_path: Path) -> None:
    """`lowband tokens` writes the file; the coordinator takes it with --worker-tokens and each worker its line
    with --name and --token-file; the run completes, and no token is in the run directory."""
    tokens_file = tmp_path / "workers.tokens"
    subprocess.run([*LOWBAND, "tokens", "--workers", "2", "--out", str(tokens_file)], check=True, timeout=120)
    tokens = read_worker_tokens(tokens_file)
    cfg = tiny_config(run_dir=str(tmp_path / "runs"))
    coord, address = start_coordinator(write_recipe(cfg, tmp_path / "tiny.yaml"), tmp_path,
                                       "--worker-tokens", str(tokens_file))
    workers = [start_worker(address, tmp_path, i, "--name", f"w{i}", "--token-file", str(tokens_file))
               for i in range(2)]
    for i, w in enumerate(workers):
        assert finish(w, 180, tmp_path / f"worker{i}.log") == 0, (tmp_path / f"worker{i}.log").read_text()
    assert finish(coord, 180, tmp_path / "coordinator.log") == 0
    run_dir = tmp_path / "runs" / "tiny"
    assert (run_dir / "summary.json").exists()
    for path in run_dir.iterdir():
        if path.is_file():
            assert not any(t.encode() in path.read_bytes() for t in tokens.values()), path.name
