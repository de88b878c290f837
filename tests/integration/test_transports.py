"""One protocol, three transports, one global state: the acceptance test of the round loop's transport seam.

The same config and seeds run over `grpc` (a real CoordinatorServer in this process and two real
`lowband worker` processes), `allgather` (two spawned gloo ranks, every rank aggregating) and `inproc`
(worker threads on the coordinator's state machine). With `cluster.fold_order: worker` the aggregator
folds in join order, as all-gather folds in rank order, so after every round every replica on every
transport must be bit-identical: same digests (sha256 over params, outer momentum and downlink shift)
and torch.equal parameters. The cases cover a dense downlink (EControl, whose aggregator keeps
per-worker shifts), a codec downlink under ef14 (DiLoCo, int8) and SparseLoCo's sparse downlink.

One spawn of 2 ranks serves every all-gather check (the byte counting too): starting processes costs
more than the work.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from coordinator.server import CoordinatorServer
from deploy.inproc import run_inproc
from protocols.config import RunConfig
from protocols.downlink import Downlink
from protocols.registry import build_protocol
from protocols.replica import Replica
from tests.conftest import tiny_config
from tests.integration.procs import finish, start_worker, wait_for
from worker.runners import run_allgather_rank
from worker.spawn import spawn_on_loopback
from worker.trainer import params_digest
from worker.transports.allgather import allgather_bytes_counted, process_group

WORLD = 2
ROUNDS = 3  # error-feedback residuals and EControl's shifts only matter from the second round on
CASES: dict[str, dict[str, Any]] = {
    # Dense downlink; top-10% uplink under EControl error feedback, per-worker shifts in the aggregator.
    "econtrol-dense-downlink": {"kind": "econtrol", "inner_steps": 2},
    # Dense uplink; int8 downlink under the aggregator's ef14 residual.
    "diloco-int8-downlink": {"kind": "diloco", "inner_steps": 2, "downlink": {"codec": "int8"}},
    # SparseLoCo's default sparse downlink (union of top-k coordinates, or the updates relayed).
    "sparseloco-sparse-downlink": {"kind": "sparseloco", "inner_steps": 2},
    # On arrival: each round's aggregate merged after exactly one of the next round's inner steps, on every
    # transport (the round's exchange runs while that step does).
    "sparseloco-on-arrival": {"kind": "sparseloco", "inner_steps": 2,
                              "overlap": {"enabled": True, "mode": "on_arrival", "delay_steps": 1}},
}
DOWNLINK_MODES = {"econtrol-dense-downlink": "dense", "diloco-int8-downlink": "codec",
                  "sparseloco-sparse-downlink": "sparse", "sparseloco-on-arrival": "sparse"}
# Per rank: (first, second, third) all-gather inputs. Trailing zero bytes must survive the padding.
BUFFERS = [(b"", b"\x00\x07\x00\x00", b""), (bytes(range(200, 256)) * 20, b"\x09", b"")]


def case_config(case: str, transport: str) -> RunConfig:
    return tiny_config(
        protocol=CASES[case],
        train={"steps": ROUNDS * 2, "lr": 1e-2, "warmup_steps": 1, "eval_batches": 2, "eval_every_steps": 6},
        cluster={"workers": WORLD, "transport": transport, "fold_order": "worker", "round_deadline_s": 120,
                 "heartbeat_interval_s": 0.5},
    )


# ---- grpc: a real coordinator, real worker processes ----------------------------------------------
class RecordingServer(CoordinatorServer):
    """The real server, keeping the replica after every round (`state.aggregates` keeps only the last 4)."""

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__(cfg, bind="127.0.0.1:0")
        self.replicas: list[Replica] = []

    def _on_round(self, record: Any, aggregator: Any) -> None:  # the state machine's on_round hook
        # A copy: the coordinator steps its replica in place at the next close unless it is lent.
        self.replicas.append(aggregator.replica.copy())
        super()._on_round(record, aggregator)


@dataclass
class GrpcRun:
    summary: dict[str, Any]
    results: list[dict[str, Any]]  # each worker's WorkerResult (--result-json), by worker id
    replicas: list[Replica]  # the coordinator's replica after every round
    history: list[Any]  # the coordinator's RoundRecords


def run_grpc(
    cfg: RunConfig, tmp: Path, extra: tuple[tuple[str, ...], ...] = ((), ()), in_order: bool = False
) -> GrpcRun:
    """Serve `cfg` and run one `lowband worker` per entry of `extra` (its extra CLI flags), all at once,
    or (`in_order`) each started once the previous one joined, so the i-th entry is worker w<i>."""
    server = RecordingServer(cfg)
    server.start()
    try:
        procs = []
        for i, flags in enumerate(extra):
            procs.append(start_worker(server.address, tmp, i, "--threads", "1", *flags))
            if in_order:
                def joined(n: int = i + 1) -> bool:
                    return len(server.state.members_copy()) >= n or procs[-1].poll() is not None

                wait_for(joined, 120, f"worker {i} to join")
        for i, proc in enumerate(procs):
            assert finish(proc, 300, tmp / f"worker{i}.log") == 0, (tmp / f"worker{i}.log").read_text()[-3000:]
        assert server.wait_finished(60)
        summary = server.summary()
    finally:
        server.stop()
    results = [json.loads((tmp / f"worker{i}.json").read_text()) for i in range(len(extra))]
    return GrpcRun(summary, sorted(results, key=lambda r: r["worker_id"]), server.replicas, list(server.state.history))


@pytest.fixture(scope="module")
def grpc_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, GrpcRun]:
    return {case: run_grpc(case_config(case, "grpc"), tmp_path_factory.mktemp(f"grpc-{case}")) for case in CASES}


# ---- allgather: spawned gloo ranks ------------------------------------------------------------------
def _rank_main(rank: int, world: int, init_method: str, store: str) -> dict[str, Any]:
    """One gloo rank: the byte-counting checks in one process group, then every case through
    `run_allgather_rank` (what `run_allgather_local` spawns), each opening its own group on a file store."""
    out: dict[str, Any] = {"allgather": [], "cases": {}}
    with process_group(rank, world, init_method, "gloo", timeout_s=60):
        for data in BUFFERS[rank]:
            out["allgather"].append(allgather_bytes_counted(data))
    for i, case in enumerate(CASES):
        cfg = case_config(case, "allgather")
        out["cases"][case] = run_allgather_rank(rank, world, f"file://{store}-{i}", cfg, timeout_s=120)
    return out


@pytest.fixture(scope="module")
def allgather_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    store = tmp_path_factory.mktemp("allgather") / "store"
    return spawn_on_loopback(_rank_main, WORLD, (str(store),))


# ---- inproc ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def inproc_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[dict[str, Any], list[Any], Replica]]:
    runs = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the grpc workers and gloo ranks train on one thread each
    try:
        for case in CASES:
            run_dir = tmp_path_factory.mktemp(f"inproc-{case}")
            summary, results = run_inproc(case_config(case, "inproc"), run_dir=run_dir)
            replica = torch.load(run_dir / "checkpoint.pt", weights_only=False)["replica"]
            runs[case] = (summary, results, replica)
    finally:
        torch.set_num_threads(threads)
    return runs


def _assert_replicas_equal(got: Replica, want: Replica, where: str) -> None:
    assert (got.round, got.outer_steps) == (want.round, want.outer_steps), where
    for part in ("params", "momentum", "downlink_shift"):
        a, b = getattr(got, part), getattr(want, part)
        assert sorted(a) == sorted(b), (where, part)
        for name in b:
            assert torch.equal(a[name], b[name]), (where, part, name)


# ---- tests ----------------------------------------------------------------------------------------------
def test_allgather_bytes_returns_every_ranks_exact_bytes_and_counts_the_ring(
    allgather_ranks: list[dict[str, Any]],
) -> None:
    for call, _ in enumerate(BUFFERS[0]):
        want = [BUFFERS[r][call] for r in range(WORLD)]
        padded = max(len(b) for b in want)
        for rank in range(WORLD):
            got, sent = allgather_ranks[rank]["allgather"][call]
            assert got == want, (rank, call)
            # One 8-byte size block plus one padded data block go to each of the W - 1 other ranks.
            assert sent == (WORLD - 1) * (8 + padded)


@pytest.mark.parametrize("case", list(CASES))
def test_every_transport_reaches_the_same_global_state_bit_for_bit(
    case: str,
    grpc_runs: dict[str, GrpcRun],
    allgather_ranks: list[dict[str, Any]],
    inproc_runs: dict[str, tuple[dict[str, Any], list[Any], Replica]],
) -> None:
    cfg = case_config(case, "grpc")
    downlink = Downlink.of(cfg.protocol, build_protocol(cfg))
    assert downlink.mode == DOWNLINK_MODES[case]  # each case tests the downlink it names
    grpc = grpc_runs[case]
    want = [r.digest() for r in grpc.replicas]  # the coordinator's digest after every round
    assert len(want) == ROUNDS

    # gRPC: each worker's replica equals the coordinator's after every round, with no resync to get there.
    assert grpc.summary["state_hash"] == want[-1] and grpc.summary["resyncs"] == 0
    for r in grpc.results:
        got = (r["state_hashes"], r["rounds"], r["resyncs"], r["stale_updates"])
        assert got == (want, ROUNDS, 0, 0), r["worker_id"]
        assert r["param_hash"] == params_digest(grpc.replicas[-1].params)

    # all-gather: every rank aggregated by itself and got the coordinator's replicas.
    for rank, out in enumerate(allgather_ranks):
        got = out["cases"][case]
        assert (got["rank"], got["state_hashes"], got["resyncs"]) == (rank, want, 0), (case, rank)
        assert got["param_hash"] == params_digest(grpc.replicas[-1].params)

    # inproc: threads on the state machine, the same again; its final replica is torch.equal to gRPC's.
    summary, results, replica = inproc_runs[case]
    assert summary["state_hash"] == want[-1] and summary["resyncs"] == 0
    assert [r.state_hashes for r in results] == [want] * WORLD
    assert replica.digest() == want[-1]
    if cfg.protocol.overlap.on_arrival:  # every round after the first merged the previous aggregate mid-round
        assert all(r["merged_after_steps"] == [1] * (ROUNDS - 1) for r in grpc.results)
        assert all(r.merged_after_steps == [1] * (ROUNDS - 1) for r in results)
    _assert_replicas_equal(replica, grpc.replicas[-1], case)
    first, last = grpc.replicas[0].params, grpc.replicas[-1].params
    assert any(not torch.equal(first[n], last[n]) for n in first)  # the rounds really moved the parameters


def test_compressed_downlinks_send_less_than_the_dense_one(grpc_runs: dict[str, GrpcRun]) -> None:
    def downlink_bytes(case: str) -> int:
        records = grpc_runs[case].history
        assert len(records) == ROUNDS
        return sum(r.downlink_bytes for r in records)

    dense = downlink_bytes("econtrol-dense-downlink")  # the same model, float32
    assert downlink_bytes("diloco-int8-downlink") < 0.3 * dense  # 1 byte per value plus scales, not 4
    assert downlink_bytes("sparseloco-sparse-downlink") < 0.3 * dense
    # What the coordinator counted as sent down reached the workers (both ways are counted per worker).
    for case in CASES:
        for worker in grpc_runs[case].summary["workers"].values():
            assert worker["bytes_received"] >= downlink_bytes(case)
            assert worker["bytes_total"] == worker["bytes_sent"] + worker["bytes_received"] > 0


def test_allgather_training_lowers_the_loss_and_counts_ring_bytes(allgather_ranks: list[dict[str, Any]]) -> None:
    zero, one = (allgather_ranks[rank]["cases"]["diloco-int8-downlink"] for rank in range(WORLD))
    assert (zero["rounds"], zero["steps"], zero["world_size"], zero["backend"]) == (ROUNDS, 6, WORLD, "gloo")
    assert zero["param_hash"] == one["param_hash"]
    assert [p["step"] for p in zero["evals"]] == [0, 6]  # rank 0 evaluates
    assert zero["final_eval_loss"] < zero["evals"][0]["eval_loss"] - 0.3
    for case in CASES:
        for out in allgather_ranks:
            got = out["cases"][case]
            # The ring receives as many blocks as it sends.
            assert got["bytes_sent"] == got["bytes_received"] > 0 and got["bytes_total"] == 2 * got["bytes_sent"]
    sparse = allgather_ranks[0]["cases"]["sparseloco-sparse-downlink"]["bytes_sent"]
    assert sparse < 0.25 * zero["bytes_sent"]  # top-k with 2-bit values against DiLoCo's dense float32 uplink


def test_a_protocol_without_an_aggregator_half_is_refused_before_any_process_group() -> None:
    cfg = tiny_config(protocol={"kind": "ddp"})
    with pytest.raises(ValueError, match="does not run through the coordinator"):
        run_allgather_rank(0, 1, "tcp://127.0.0.1:1", cfg)
    assert not dist.is_initialized()
