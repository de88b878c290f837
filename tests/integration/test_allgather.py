"""The torch all-gather transport (worker/collectives.py) with real gloo processes on loopback.

The claim under test: a protocol run over all-gather, every rank aggregating locally in rank order, gives
the same global state as the gRPC coordinator folding the same updates in the same order. One spawn of
2 ranks serves every test (starting processes costs more than the work): first a process group for the
all-gather checks and the equivalence rounds, then a fresh one (file store) for a short training run.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist

from coordinator.server import CoordinatorServer
from protocols.base import Params
from protocols.config import RunConfig
from protocols.registry import build_protocol
from protocols.wire import serde
from tests.conftest import tiny_config
from worker.allgather_runtime import process_group, run_allgather_worker
from worker.client import CoordinatorClient
from worker.collectives import allgather_bytes_counted, decentralized_round
from worker.data import load_corpus
from worker.model import GPT
from worker.spawn import spawn_on_loopback

WORLD = 2
ROUNDS = 3  # error-feedback buffers and EControl's mirror only matter from the second round on
CASES: dict[str, dict[str, Any]] = {
    "diloco-dense": {"kind": "diloco", "inner_steps": 1},
    "diloco-int8": {"kind": "diloco", "inner_steps": 1, "compression": {"codec": "int8"}},
    "econtrol-topk10": {"kind": "econtrol", "inner_steps": 1},  # the paper's defaults: top-10%, eta 0.1
    "econtrol-int2": {"kind": "econtrol", "inner_steps": 1, "compression": {"codec": "int2", "eta": 0.5}},
}
# Per rank: (first, second, third) all-gather inputs. Trailing zero bytes must survive the padding.
BUFFERS = [(b"", b"\x00\x07\x00\x00", b""), (bytes(range(200, 256)) * 20, b"\x09", b"")]


def case_config(case: str) -> RunConfig:
    protocol = CASES[case]
    steps = ROUNDS * protocol["inner_steps"]
    return tiny_config(protocol=protocol, train={"steps": steps}, cluster={"workers": WORLD})


def initial_state() -> Params:
    gen = torch.Generator().manual_seed(11)
    return {"emb": torch.randn(12, 8, generator=gen), "w": torch.randn(8, 24, generator=gen), "b": torch.zeros(24)}


def local_params(global_: Params, rank: int, round_: int) -> Params:
    """What rank `rank` 'trained' to in round `round_`: global minus a seeded random step."""
    out = {}
    for i, (name, value) in enumerate(sorted(global_.items())):
        gen = torch.Generator().manual_seed(1000 * round_ + 10 * rank + i)
        out[name] = value - 0.05 * (1 + rank) * torch.randn(value.shape, generator=gen)
    return out


TRAIN_CFG = tiny_config(
    protocol={"kind": "econtrol", "inner_steps": 2},
    train={"steps": 16, "lr": 1e-2, "warmup_steps": 2, "eval_batches": 2, "eval_every_steps": 8},
)


def _rank_main(rank: int, world: int, init_method: str, store: str) -> dict[str, Any]:
    """One gloo rank: the all-gather checks, every case's rounds via decentralized_round (path A), then
    a training run through `run_allgather_worker`, which opens its own process group on `store`."""
    out: dict[str, Any] = {"allgather": [], "cases": {}}
    with process_group(rank, world, init_method, "gloo", timeout_s=60):
        for data in BUFFERS[rank]:
            out["allgather"].append(allgather_bytes_counted(data))
        for case in CASES:
            protocol = build_protocol(case_config(case))
            global_ = initial_state()
            server_state = protocol.init_server_state(global_)
            worker_state = protocol.init_worker_state(global_)
            rounds = []
            for r in range(ROUNDS):
                update, worker_state = protocol.make_update(local_params(global_, rank, r), global_, worker_state)
                global_, server_state, sent = decentralized_round(protocol, global_, update, server_state)
                rounds.append((global_, sent))
            out["cases"][case] = rounds
    out["train"] = run_allgather_worker(rank, world, f"file://{store}", TRAIN_CFG, timeout_s=60)
    return out


@pytest.fixture(scope="module")
def path_a(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    store = tmp_path_factory.mktemp("allgather") / "store"
    return spawn_on_loopback(_rank_main, WORLD, (str(store),))


def test_allgather_bytes_returns_every_ranks_exact_bytes_and_counts_the_ring(path_a: list[dict[str, Any]]) -> None:
    for call, _ in enumerate(BUFFERS[0]):
        want = [BUFFERS[r][call] for r in range(WORLD)]
        padded = max(len(b) for b in want)
        for rank in range(WORLD):
            got, sent = path_a[rank]["allgather"][call]
            assert got == want, (rank, call)
            # One 8-byte size block plus one padded data block go to each of the W - 1 other ranks.
            assert sent == (WORLD - 1) * (8 + padded)


def _grpc_path(case: str) -> list[tuple[Params, str, list[int]]]:
    """Path B: the real coordinator, two clients pushing the same updates in rank order."""
    cfg = case_config(case)
    protocol = build_protocol(cfg)
    server = CoordinatorServer(cfg).start()
    clients = [CoordinatorClient(server.address) for _ in range(WORLD)]
    try:
        for c in clients:
            c.join("test")
        clients[0].offer_state(initial_state())
        assert clients[0].wait_round(-1).round == 0
        states = [protocol.init_worker_state(initial_state()) for _ in range(WORLD)]
        results = []
        for r in range(ROUNDS):
            pulled = [c.pull()[1] for c in clients]
            sizes = []
            for rank, client in enumerate(clients):
                local = local_params(pulled[rank], rank, r)
                update, states[rank] = protocol.make_update(local, pulled[rank], states[rank])
                sizes.append(len(serde.update_to_bytes(update.payloads, update.weight)))
                assert client.push(r, update, {}).accepted  # sequential: the coordinator folds rank 0 first
            assert clients[0].wait_round(r).round == r + 1
            _, new_global = clients[0].pull()
            results.append((new_global, clients[0].last_state_hash, sizes))
        return results
    finally:
        for c in clients:
            c.close()
        server.stop()


@pytest.mark.parametrize("case", list(CASES))
def test_allgather_path_gives_the_grpc_coordinators_global_state_every_round(
    path_a: list[dict[str, Any]], case: str
) -> None:
    grpc_rounds = _grpc_path(case)
    for r, (want, want_hash, sizes) in enumerate(grpc_rounds):
        for rank in range(WORLD):
            got, sent = path_a[rank]["cases"][case][r]
            assert sorted(got) == sorted(want)
            # Same updates, same fold order, same float ops on the same machine: bit-identical, no tolerance.
            for name in want:
                assert torch.equal(got[name], want[name]), (case, r, rank, name)
            assert serde.state_hash(got) == want_hash
            assert sent == (WORLD - 1) * (8 + max(sizes))
    first, last = grpc_rounds[0][0], grpc_rounds[-1][0]
    assert not torch.equal(first["w"], last["w"])  # the rounds really moved the state


def test_two_rank_allgather_training_lowers_the_loss_and_keeps_replicas_identical(
    path_a: list[dict[str, Any]],
) -> None:
    zero, one = (path_a[rank]["train"] for rank in range(WORLD))
    assert (zero["rank"], one["rank"], zero["protocol"], zero["rounds"]) == (0, 1, "econtrol", 8)
    assert zero["param_hash"] == one["param_hash"]
    assert zero["evals"] == one["evals"]
    assert [p["step"] for p in zero["evals"]] == [0, 8, 16]
    assert zero["eval_loss"] < zero["evals"][0]["eval_loss"] - 0.3
    assert zero["tokens"] == 16 * 8 * 32 and zero["tokens_total"] == WORLD * zero["tokens"]
    # Top-10% updates: far less than a dense float32 model per round would cost.
    dense_bytes_per_round = sum(t.numel() * 4 for t in _tiny_model_params(TRAIN_CFG).values())
    assert 0 < zero["bytes_sent"] == one["bytes_sent"] < 0.5 * 8 * (WORLD - 1) * dense_bytes_per_round


def _tiny_model_params(cfg: RunConfig) -> Params:
    vocab = load_corpus(cfg.data.eval_fraction, cfg.data.max_chars).tokenizer.vocab_size
    return {n: p.detach() for n, p in GPT(cfg.model, vocab).named_parameters()}


def test_a_protocol_without_a_coordinator_half_is_refused_before_any_process_group() -> None:
    cfg = tiny_config(protocol={"kind": "ddp"})
    with pytest.raises(ValueError, match="does not run through the coordinator"):
        run_allgather_worker(0, 1, "tcp://127.0.0.1:1", cfg)
    assert not dist.is_initialized()
