"""A 4-worker gossip run over real gRPC peer connections: `lowband coordinator` (only the rendezvous) and four
`lowband worker` processes that serve each other the Peer service on loopback.

The models go worker to worker: the rendezvous' own byte counters stay below the size of a single model
message per worker, while every worker moves several models' worth. Each worker starts from its own random
model (independent_init), so the consensus distance in metrics.jsonl starts large and gossip shrinks it.
"""

from __future__ import annotations

import json
from pathlib import Path

from protocols.config import RunConfig
from tests.conftest import tiny_config
from tests.integration.procs import finish, start_coordinator, start_worker, write_recipe
from worker.data import load_corpus
from worker.model import GPT


def test_four_workers_gossip_over_grpc_peers_for_three_rounds_without_a_tensor_through_the_coordinator(
    tmp_path: Path,
) -> None:
    rounds, inner, workers = 3, 5, 4
    cfg = tiny_config(
        name="gossip", run_dir=str(tmp_path / "runs"),
        protocol={"kind": "gossip", "inner_steps": inner, "gossip_steps": 1, "topology": "one_peer_exponential",
                  "independent_init": True, "peer_timeout_s": 60},
        train={"steps": inner * rounds, "lr": 1e-2, "warmup_steps": 1, "eval_batches": 2, "eval_every_steps": inner},
        cluster={"workers": workers, "heartbeat_interval_s": 0.5, "token": "gossip-token"},
    )
    assert cfg.cluster.transport == "p2p"
    coord, address = start_coordinator(write_recipe(cfg, tmp_path / "gossip.yaml"), tmp_path)
    procs = [start_worker(address, tmp_path, i, "--token", "gossip-token") for i in range(workers)]
    for i, proc in enumerate(procs):
        assert finish(proc, 300, tmp_path / f"worker{i}.log") == 0, (tmp_path / f"worker{i}.log").read_text()
    assert finish(coord, 120, tmp_path / "coordinator.log") == 0, (tmp_path / "coordinator.log").read_text()

    run_dir = tmp_path / "runs" / "gossip"
    summary = json.loads((run_dir / "summary.json").read_text())
    results = [json.loads((tmp_path / f"worker{i}.json").read_text()) for i in range(workers)]
    assert summary["rounds"] == rounds and summary["transport"] == "p2p"
    assert sorted(r["index"] for r in results) == list(range(workers))
    for r in results:
        assert r["rounds"] == rounds and r["steps"] == inner * rounds
        assert r["skipped_messages"] == 0 and r["refused_sends"] == 0

    # One model message (dense float32 parameters) is bigger than everything a worker said to the rendezvous;
    # each worker sent its model to a neighbour every round, worker to worker.
    message_bytes = model_bytes(cfg)
    assert len(summary["rendezvous_bytes"]) == workers
    for counted in summary["rendezvous_bytes"].values():
        assert 0 < counted["bytes_total"] < message_bytes
    for r in results:
        assert r["bytes_sent"] > rounds * message_bytes
        assert r["bytes_received"] > rounds * message_bytes

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rounds_logged = [row for row in rows if row["event"] == "round"]
    assert [row["round"] for row in rounds_logged] == list(range(rounds))
    distances = [row["consensus_distance"] for row in rounds_logged]
    assert all(d is not None and d >= 0 for d in distances), distances
    assert distances[-1] < 0.5 * distances[0], distances  # independent models pulled together by gossip


def model_bytes(cfg: RunConfig) -> int:
    """Bytes of the run's model parameters (the tiny GPT): the tensor data of one dense gossip message."""
    corpus = load_corpus(cfg.data.eval_fraction, cfg.data.max_chars)
    model = GPT(cfg.model, corpus.tokenizer.vocab_size)
    return sum(p.numel() * p.element_size() for p in model.parameters())
