"""`lowband simulate`: 1,000 digits clients, 10% sampled per round, the slowest 20% past the deadline and 5%
dropping out. The run completes, its loss falls, and the participation it logs matches the configured
rates within a binomial tolerance."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

from tests.integration.procs import LOWBAND

ROUNDS, CLIENTS, PER_ROUND = 30, 1000, 100


def test_a_thousand_clients_with_stragglers_and_dropouts(tmp_path: Path) -> None:
    overrides = [f"run_dir={tmp_path}", f"simulation.clients={CLIENTS}", f"simulation.rounds={ROUNDS}",
                 "simulation.fraction=0.1", "simulation.partition=iid", "simulation.eval_every=5",
                 "simulation.timing.dropout=0.05", "simulation.timing.deadline_quantile=0.8"]
    done = subprocess.run([*LOWBAND, "simulate", "fedavg-digits", *[a for o in overrides for a in ("--set", o)]],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    run_dir = tmp_path / "fedavg-digits"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rounds = [r for r in rows if r["event"] == "round"]
    assert [r["round"] for r in rounds] == list(range(ROUNDS))
    # Not a terminal: a plain line per round.
    assert sum(line.startswith("round ") for line in done.stdout.splitlines()) == ROUNDS

    sampled = sum(r["sampled"] for r in rounds)
    assert all(r["sampled"] == PER_ROUND for r in rounds)
    dropped = sum(r["dropped"] for r in rounds) / sampled
    assert abs(dropped - 0.05) < 4 * math.sqrt(0.05 * 0.95 / sampled), dropped
    answered = sampled - sum(r["dropped"] for r in rounds)
    late = sum(r["late"] for r in rounds) / answered
    # 20% of the clients are stragglers; each round samples 100 of the 1,000 without replacement.
    assert abs(late - 0.2) < 4 * math.sqrt(0.2 * 0.8 / answered), late
    assert all(r["aggregated"] == r["sampled"] - r["dropped"] - r["late"] for r in rounds)
    assert all(r["messages"] <= 2 for r in rounds)  # the pool's 2 workers, not the clients

    evaluated = [r for r in rounds if "eval_loss" in r]
    assert evaluated[-1]["eval_loss"] < evaluated[0]["eval_loss"] < math.log(10) + 0.1
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds"] == ROUNDS and summary["clients"] == CLIENTS
    # Every client that trained keeps its state in the store; the 200 stragglers never delivered (late: drop),
    # and 30 rounds of 100 reach about 96% of the others.
    assert 0.7 * CLIENTS < summary["clients_with_state"] <= 0.8 * CLIENTS
    assert (run_dir / "metrics.png").stat().st_size > 0 and (run_dir / "participation.png").stat().st_size > 0


def test_the_pool_as_ray_actors_trains_what_the_threads_train(tmp_path: Path) -> None:
    import ray
    import torch

    from protocols.config import parse_config
    from worker.federated.simulation import Simulation

    data = {"name": "ray-sim", "protocol": {"kind": "fedavg"}, "cluster": {"cpus_per_worker": 0.5},
            "simulation": {"task": "digits", "clients": 30, "fraction": 0.3, "rounds": 3, "workers": 2}}
    results = {}
    for backend in ("inproc", "ray"):
        cfg = parse_config({**data, "simulation": {**data["simulation"], "backend": backend}})
        pool = None
        if backend == "ray":
            from deploy.simulate_ray import ray_pool

            pool = ray_pool()
        sim = Simulation(cfg, spill_dir=tmp_path / backend, pool=pool)
        if backend == "ray":
            from deploy.simulate_ray import RemotePoolWorker

            assert all(isinstance(w, RemotePoolWorker) for w in sim.workers) and not sim.local_workers
        logs = list(sim.rounds())
        sim.close()
        results[backend] = (sim.aggregator.replica.params, [log.aggregated for log in logs])
    try:
        assert ray.is_initialized()
        assert results["ray"][1] == results["inproc"][1] == [9, 9, 9]
        for name, t in results["inproc"][0].items():
            torch.testing.assert_close(results["ray"][0][name], t, rtol=1e-5, atol=1e-6)
    finally:
        ray.shutdown()
