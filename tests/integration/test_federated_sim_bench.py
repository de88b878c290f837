"""bench.federated_sim, the lowband side only (no Flower environment, no Ray): a short `lowband simulate
fedavg-digits` as a fresh process through the bench's own runner, the row and targets computed from it, and
the pieces bench/flower_digits.py mirrors from lowband (client sampling, client seeds, shards, batches, a
client's local SGD) checked against lowband's own, so that the Flower contender trains the same task.
No wall-clock thresholds: a smoke run.
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from bench import flower_digits
from bench.federated_sim import add_ratios, digits_overrides, digits_row, run_lowband, targets, wire_bytes
from deploy.cli import recipe_path
from protocols.config import load_config
from worker.federated.engine import Engine
from worker.federated.local import train_client
from worker.federated.tasks import DigitsTask
from worker.federated.timing import sample_clients

ROUNDS, CLIENTS = 4, 100


def test_flower_side_mirrors_lowband_task() -> None:
    for clients, per_round, round_, seed in ((100, 10, 0, 0), (100, 10, 7, 0), (1000, 100, 3, 0), (1000, 100, 2, 5)):
        assert np.array_equal(flower_digits.sample_clients(clients, per_round, round_, seed),
                              sample_clients(clients, per_round, round_, seed))
        for c in (0, 17, clients - 1):
            job = Engine._job(SimpleNamespace(seed=seed, noise=None), c, round_)  # type: ignore[arg-type]
            assert flower_digits.client_seed(seed, round_, c) == job.seed

    for clients in (1000, CLIENTS):  # 1,000 clients leave a few samples each; 100, enough for several batches
        cfg = load_config(recipe_path("fedavg-digits"), [f"simulation.clients={clients}"])
        task = DigitsTask(cfg)
        train_x, train_y, parts = flower_digits.shards(clients, 0.5, 0)
        assert len(parts) == len(task.parts) == clients
        assert all(np.array_equal(a, b) for a, b in zip(parts, task.parts, strict=True))
        assert np.array_equal(train_y, task.data.train_y)

    # One client's round from the same global model: the same batches, the same parameters after SGD.
    client = int(np.argmax([len(p) for p in parts]))  # the largest shard: several batches
    seed = flower_digits.client_seed(0, 0, client)
    ours = task.batches(client, 1, 16, None, torch.Generator().manual_seed(seed))
    theirs = flower_digits.batches(torch.from_numpy(train_x), torch.from_numpy(train_y), parts[client], 1, 16,
                                   torch.Generator().manual_seed(seed))
    assert len(ours) == len(theirs) > 1
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(ours, theirs, strict=True))
    torch.manual_seed(0)
    model = task.build_model()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    local, loss = train_client(model, start, ours, lr=0.05)
    cfg_msg = {"clients": CLIENTS, "alpha": 0.5, "seed": 0, "client": client, "client-seed": seed, "epochs": 1,
               "batch-size": 16, "lr": 0.05}
    threads = torch.get_num_threads()
    try:
        state, samples, flower_loss = flower_digits.train_client(start, cfg_msg)  # pins 1 torch thread
    finally:
        torch.set_num_threads(threads)
    assert samples == task.samples(client)
    assert flower_loss == pytest.approx(loss)
    assert local.keys() == state.keys()
    assert all(torch.allclose(local[n], state[n], rtol=0, atol=1e-6) for n in local), [
        float((local[n] - state[n]).abs().max()) for n in local]


def test_lowband_row_and_targets(tmp_path: Path) -> None:
    proc = run_lowband("fedavg-digits", "lowband-100x10", digits_overrides(CLIENTS, ROUNDS, 0), tmp_path, 120)
    row = digits_row("lowband-100x10", proc, CLIENTS, ROUNDS, warmup=1)
    assert row["rounds"] == ROUNDS and row["clients"] == CLIENTS and row["clients_per_round"] == 10
    assert [r["round"] for r in proc.rounds] == list(range(1, ROUNDS + 1))
    times = [r["t"] for r in proc.rounds]
    assert proc.launched < times[0] and times == sorted(times)
    assert row["first_round_s"] == pytest.approx(times[0] - proc.launched)
    assert row["rounds_per_s"] == pytest.approx((ROUNDS - 1) / (times[-1] - times[0]))
    # One process, one model of 4,810 parameters: well over the interpreter's own footprint, far under 4 GiB.
    assert 50 * 2**20 < row["peak_rss_bytes"] < 4 * 2**30
    assert len(row["accuracy_curve"]) == len(row["eval_loss_curve"]) == ROUNDS
    assert 0.0 <= row["accuracy"] <= 1.0 and math.isfinite(row["eval_loss"])
    assert row["eval_loss"] == proc.extra["final_eval_loss"] and row["accuracy"] == proc.extra["final_accuracy"]
    # Both ways per pool worker: each round a pool worker reads the 4,810-parameter replica and sends a partial.
    assert row["bytes_total_per_worker"] == row["bytes_sent_per_worker"] + row["bytes_received_per_worker"]
    assert row["bytes_received_per_worker"] <= ROUNDS * 4810 * 4 and row["bytes_sent_per_worker"] > 0
    flower = wire_bytes("flower-100x10", proc, {"bytes_to_clients": 8000, "bytes_from_clients": 6000})
    assert flower == {"bytes_sent_per_worker": 3000, "bytes_received_per_worker": 4000, "bytes_total_per_worker": 7000}

    # Ratios and pass/fail against a made-up Flower row (the real one needs .bench-envs/flower and Ray).
    slow = {**row, "contender": "flower-100x10", "rounds_per_s": row["rounds_per_s"] / 8,
            "accuracy": row["accuracy"] - 0.02}
    rows = [dict(row), slow]
    add_ratios(rows)
    assert rows[0]["rounds_per_s_vs_flower"] == pytest.approx(8.0)
    assert rows[0]["accuracy_minus_flower"] == pytest.approx(0.02)
    assert "rounds_per_s_vs_flower" not in rows[1]
    big = [{**r, "contender": r["contender"].replace("100x10", "1000x100"), "clients": 1000} for r in rows]
    t = targets([*big, {"contender": "lowband-shakespeare-10k", "clients": 10_000, "peak_rss_bytes": 2**30}])
    assert t["rounds_per_s_vs_flower_1000x100"]["pass"] is True
    assert t["accuracy_within_1_point_1000x100"]["pass"] is False  # 2 points apart
    assert t["shakespeare_10k_clients_fit_in_24_gib"]["pass"] is True
    assert t["lowband_first_round_s"]["pass"] is (row["first_round_s"] <= 3.0)
