"""The federated simulator: seeded participation, the client store, partial aggregates that equal the
mean over clients, the pool size not mattering, FedBuff's staleness, late updates carried with a weight."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from compression.payload import dense, dense_values
from protocols.config import ConfigError, RunConfig, parse_config
from protocols.simulation_config import ClientTimingConfig
from worker.federated.pool import ClientJob, PoolWorker
from worker.federated.simulation import Simulation
from worker.federated.store import ClientStore
from worker.federated.timing import client_speeds, deadline, round_fates, sample_clients, staleness_weight


def digits(**simulation: Any) -> RunConfig:
    base = {"task": "digits", "clients": 40, "fraction": 0.25, "rounds": 4, "partition": "dirichlet", "workers": 2,
            "eval_every": 2}
    return parse_config({"name": "sim", "protocol": {"kind": "fedavg"}, "simulation": {**base, **simulation}})


def run(cfg: RunConfig) -> tuple[Simulation, list[Any]]:
    sim = Simulation(cfg)
    logs = list(sim.rounds())
    sim.close()
    return sim, logs


def test_sampling_is_seeded_distinct_and_per_round() -> None:
    a = sample_clients(1000, 100, 3, seed=7)
    assert len(set(a.tolist())) == 100 and np.array_equal(a, sample_clients(1000, 100, 3, seed=7))
    assert not np.array_equal(a, sample_clients(1000, 100, 4, seed=7))
    assert not np.array_equal(a, sample_clients(1000, 100, 3, seed=8))


def test_fates_drop_and_miss_the_deadline_at_the_configured_rates() -> None:
    cfg = ClientTimingConfig(samples_per_s=100.0, sigma=1.0, dropout=0.1, deadline_quantile=0.7)
    speeds = client_speeds(cfg, 20_000, seed=1)
    work = np.full(20_000, 50.0)
    cutoff = deadline(cfg, work, speeds)
    assert cutoff is not None and np.mean(work / speeds > cutoff) == pytest.approx(0.3, abs=1e-3)
    fates = round_fates(np.arange(20_000), work, speeds, cfg, round_=0, seed=1, deadline_s=cutoff)
    dropped = np.mean([f.dropped for f in fates])
    assert abs(dropped - 0.1) < 4 * np.sqrt(0.1 * 0.9 / 20_000)
    late = [f.late for f in fates if not f.dropped]
    assert abs(np.mean(late) - 0.3) < 0.01 and not any(f.late and f.dropped for f in fates)
    assert staleness_weight(0, 0.5) == 1.0 and staleness_weight(3, 0.5) == pytest.approx(0.5)


def test_the_store_spills_past_its_budget_and_reads_back_what_it_wrote(tmp_path: Path) -> None:
    store = ClientStore(budget_bytes=3 * 4096 + 500, spill_dir=tmp_path)
    for client in range(10):
        store.put(client, {"buffer": torch.full((1024,), float(client))})
    assert store.bytes_in_memory <= 3 * 4096 + 500 and store.spilled == 7 and len(store) == 10
    assert store.get(99) is None
    for client in range(10):
        assert torch.equal(store.get(client)["buffer"], torch.full((1024,), float(client)))
    assert store.loads >= 7 and store.bytes_in_memory <= 3 * 4096 + 500


def test_a_partial_is_the_sample_weighted_mean_of_its_clients() -> None:
    sim = Simulation(digits(workers=1))
    worker, replica = sim.workers[0], sim.aggregator.replica
    jobs = [ClientJob(c, seed=c) for c in (1, 5, 9)]
    folded = worker.train(replica, jobs, fold=True)
    single = worker.train(replica, jobs, fold=False)
    weights = [o.update.weight for o in single.outcomes]
    assert weights == [sim.task.samples(c) for c in (1, 5, 9)]
    assert folded.update is not None and folded.update.weight == sum(weights)
    for name, payload in folded.update.payloads.items():
        manual = sum(w * dense_values(o.update.payloads[name]) for w, o in zip(weights, single.outcomes, strict=True))
        torch.testing.assert_close(dense_values(payload), manual / sum(weights), rtol=1e-5, atol=1e-6)
    sim.close()


def test_the_pool_size_changes_nothing_but_the_messages() -> None:
    one, logs_one = run(digits(workers=1))
    three, logs_three = run(digits(workers=3))
    for name, t in one.aggregator.replica.params.items():
        torch.testing.assert_close(three.aggregator.replica.params[name], t, rtol=1e-5, atol=1e-6)
    assert [log.aggregated for log in logs_one] == [log.aggregated for log in logs_three] == [10] * 4
    # One message per pool worker that had a sampled client: O(workers), whatever the clients per round.
    assert all(log.messages == 1 for log in logs_one)
    assert all(1 <= log.messages <= 3 for log in logs_three) and max(log.messages for log in logs_three) == 3


def test_late_updates_are_dropped_or_carried_into_the_next_round() -> None:
    timing = {"sigma": 1.0, "deadline_quantile": 0.6}
    _, dropped = run(digits(timing={**timing, "late": "drop"}))
    _, carried = run(digits(timing={**timing, "late": "stale_weight"}))
    late = [log.late for log in dropped]
    assert sum(late) > 0 and [log.late for log in carried] == late
    assert all(log.carried_in == 0 for log in dropped)
    assert [log.carried_in for log in carried] == [0, *late[:-1]]
    assert [log.aggregated for log in carried] == [10 - n + c for n, c in zip(late, [0, *late[:-1]], strict=True)]


def test_fedbuff_aggregates_every_k_arrivals_with_staleness() -> None:
    _, logs = run(digits(rounds=6, asynchronous={"enabled": True, "buffer_k": 4, "concurrency": 8},
                         timing={"sigma": 1.0, "dropout": 0.1}))
    assert all(log.aggregated == 4 for log in logs) and logs[-1].mean_staleness > 0
    assert all(b.sim_time_s >= a.sim_time_s for a, b in itertools.pairwise(logs))
    assert logs[-1].metrics["eval_loss"] < logs[1].metrics["eval_loss"]


def test_bad_simulations_are_refused_before_anything_trains() -> None:
    with pytest.raises(ConfigError, match="by_role"):
        parse_config({"simulation": {"task": "digits", "partition": "by_role"}})
    with pytest.raises(ConfigError, match="deadline"):
        parse_config({"simulation": {"timing": {"deadline_s": 1.0, "deadline_quantile": 0.5}}})
    with pytest.raises(ConfigError, match="weighted mean"):
        Simulation(parse_config({"protocol": {"kind": "sparseloco"}, "simulation": {"clients": 10}}))
    with pytest.raises(ConfigError, match="exceeds"):
        Simulation(parse_config({"protocol": {"kind": "fedavg"},
                                 "simulation": {"task": "shakespeare", "partition": "by_play", "clients": 100}}))


def lora_shakespeare(**simulation: Any) -> RunConfig:
    base = {"task": "shakespeare", "partition": "by_role", "clients": 12, "fraction": 0.5, "rounds": 1,
            "workers": 2, "batch_size": 4, "max_local_steps": 1}
    return parse_config({"name": "sim", "protocol": {"kind": "fedsvd"}, "lowrank": {"method": "lora", "rank": 2},
                         "model": {"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 32},
                         "data": {"max_chars": 200_000}, "train": {"eval_batches": 1},
                         "simulation": {**base, **simulation}})


def test_the_shakespeare_eval_set_does_not_depend_on_the_clients_batch() -> None:
    from worker.federated.tasks import ShakespeareTask

    small, large = (ShakespeareTask(lora_shakespeare(batch_size=b)) for b in (2, 16))
    assert len(small.eval_batches) == len(large.eval_batches) == 1
    for (x_small, y_small), (x_large, y_large) in zip(small.eval_batches, large.eval_batches, strict=True):
        assert torch.equal(x_small, x_large) and torch.equal(y_small, y_large)
        assert x_small.shape[0] == lora_shakespeare().data.batch_size


def test_a_client_update_of_the_wrong_rank_or_modules_is_refused_and_not_aggregated() -> None:
    sim = Simulation(lora_shakespeare())
    worker, replica = sim.workers[0], sim.aggregator.replica
    assert isinstance(worker, PoolWorker)
    honest = worker.protocol.make_update

    def dishonest(local: Any, start: Any, state: Any) -> Any:
        update, state = honest(local, start, state)
        name = next(n for n in update.payloads if ".lora_B." in n)
        if dishonest.calls == 0:  # client 0: rank 3 where the run has rank 2
            update.payloads[name] = dense(torch.zeros(dense_values(update.payloads[name]).shape[0], 3))
        elif dishonest.calls == 1:  # client 2: a module the run does not adapt
            update.payloads["base_model.model.lm_head.lora_B.default.weight"] = update.payloads.pop(name)
        dishonest.calls += 1
        return update, state

    dishonest.calls = 0  # type: ignore[attr-defined]
    worker.protocol.make_update = dishonest  # type: ignore[method-assign]
    partial = worker.train(replica, [ClientJob(c, seed=c) for c in (0, 2, 4)], fold=True)
    refused = {o.client: o.refused for o in partial.outcomes if o.refused}
    assert set(refused) == {0, 2}
    assert "shape" in refused[0] and "lm_head" in refused[2]
    assert partial.update is not None and partial.update.weight == sim.task.samples(4)  # only client 4 folded
    sim.close()


class Impostor:
    """A pool worker that answers for a client it was never given."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def train(self, replica: Any, jobs: list[ClientJob], fold: bool = True) -> Any:
        partial = self.inner.train(replica, jobs, fold)
        partial.outcomes[0].client = 10_000 + partial.outcomes[0].client
        return partial


def test_a_partial_speaking_for_a_client_not_sampled_is_refused_whole() -> None:
    sim = Simulation(digits(rounds=1))
    before = {n: t.clone() for n, t in sim.aggregator.replica.params.items()}
    sim.engine.workers[1] = Impostor(sim.engine.workers[1])
    (log,) = list(sim.rounds())
    assert log.refused == 1 and "not sampled" in sim.engine.refusals[0]
    assert log.messages == 1 and log.aggregated < log.sampled  # only pool worker 0's partial was folded
    assert any(not torch.equal(before[n], t) for n, t in sim.aggregator.replica.params.items())


def test_a_dp_budget_that_cannot_be_met_stops_the_run_before_it_starts() -> None:
    with pytest.raises(ConfigError, match="epsilon"):
        Simulation(digits(dp={"enabled": True, "epsilon": 0.01, "max_noise_multiplier": 2.0}))


def test_bytes_are_counted_both_ways_per_pool_worker() -> None:
    sim, logs = run(digits(workers=2))
    dense = sum(t.numel() * t.element_size() for t in sim.aggregator.replica.params.values())
    for log in logs:  # each working pool worker read the dense replica and sent one dense partial (+ header)
        assert log.bytes_received == log.messages * dense
        assert log.messages * dense <= log.bytes_sent <= log.messages * (dense + 4096)
    summary = sim.summary(logs)
    sent, received = sum(log.bytes_sent for log in logs), sum(log.bytes_received for log in logs)
    assert summary["bytes_sent_per_worker"] == sent / 2 and summary["bytes_received_per_worker"] == received / 2
    assert summary["bytes_total_per_worker"] == (sent + received) / 2


def test_the_dp_plan_goes_into_the_summary_and_no_client_spends_more() -> None:
    sim, logs = run(digits(rounds=2, dp={"enabled": True, "epsilon": 6.0}))
    plan = sim.summary(logs)["dp_plan"]
    assert plan["noise_multiplier"] == sim.noise and plan["rounds"] == 2 and plan["epsilon"] == 6.0
    assert 0 < plan["planned_epsilon"] <= 6.0
    assert 0 < sim.summary(logs)["dp_epsilon_max"] <= plan["planned_epsilon"] + 1e-9
