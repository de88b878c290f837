"""The federated protocols as pure math: FedAvg's weighted mean of client models, FedAvg-LoRA's known bias,
FFA-LoRA's frozen A (refused on the uplink), FedSVD's re-factorization and its aggregator mirror, and the
config checks that go with them. Every round goes through `RoundAggregator` and `apply_aggregate`."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from compression.payload import dense
from protocols.base import Aggregate, Update
from protocols.check import UpdateRejected, check_update, expectation
from protocols.config import ConfigError
from protocols.downlink import Downlink, apply_aggregate
from protocols.fedavg import FedAvg
from protocols.fedavg_lora import FedAvgLoRA
from protocols.fedsvd import FedSVD, FedSVDState, lora_pairs, refactorize
from protocols.ffa_lora import FFALoRA
from protocols.replica import Params, Replica
from protocols.round import RoundAggregator
from tests.conftest import tiny_config
from tests.unit.protocol_helpers import assert_replicas_equal, clone, dense_aggregator, rand

A1, B1 = "m.l1.lora_A.default.weight", "m.l1.lora_B.default.weight"
A2, B2 = "m.l2.lora_A.default.weight", "m.l2.lora_B.default.weight"


def factors(seed: int) -> Params:
    """Two adapted layers: (out 6, r 3, in 5) and (out 4, r 2, in 7)."""
    return {A1: rand(seed, (3, 5)), B1: rand(seed + 1, (6, 3)), A2: rand(seed + 2, (2, 7)), B2: rand(seed + 3, (4, 2))}


def eye_error(a: torch.Tensor) -> float:
    return float((a @ a.T - torch.eye(a.shape[0])).abs().max())


# ---- the kernel ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("out", "r", "n_in", "rank"), [(8, 3, 5, 3), (96, 4, 32, 4), (32, 4, 128, 4),
                                                        (10, 4, 6, 2), (7, 5, 9, 0)])
def test_refactorize_keeps_b_a_and_returns_orthonormal_rows(out: int, r: int, n_in: int, rank: int) -> None:
    # `rank` < r: B has fewer independent columns than r (rank 0: LoRA's zero B), r larger than needed.
    b = rand(out, (out, rank)) @ rand(r, (rank, r)) if rank else torch.zeros(out, r)
    a = rand(n_in, (r, n_in))
    b_new, a_new = refactorize(b, a)
    assert b_new.shape == (out, r) and a_new.shape == (r, n_in) and b_new.dtype == a_new.dtype == torch.float32
    torch.testing.assert_close(b_new @ a_new, b @ a, atol=1e-5 * (1 + float((b @ a).abs().max())), rtol=0)
    assert eye_error(a_new) < 1e-5
    gram = b_new.T @ b_new  # B' = U S: orthogonal columns, decreasing norms
    torch.testing.assert_close(gram, torch.diag(torch.diag(gram)), atol=1e-4 * (1 + float(gram.abs().max())), rtol=0)
    assert bool((torch.diag(gram)[1:] <= torch.diag(gram)[:-1] + 1e-4).all())
    # Rows beyond rank(B A) are completed inside the old A's row space: projecting on it changes nothing.
    projector = torch.linalg.pinv(a) @ a
    torch.testing.assert_close(a_new @ projector, a_new, atol=1e-5, rtol=0)


def test_refactorize_with_rank_above_the_layer_width_pads_with_zeros() -> None:
    b, a = rand(1, (3, 5)), rand(2, (5, 4))  # r = 5 > min(out 3, in 4): at most 3 orthonormal directions
    b_new, a_new = refactorize(b, a)
    torch.testing.assert_close(b_new @ a_new, b @ a, atol=1e-5, rtol=0)
    torch.testing.assert_close(a_new @ a_new.T, torch.diag(torch.tensor([1.0, 1, 1, 0, 0])), atol=1e-5, rtol=0)
    assert not bool(b_new[:, 3:].any()) and not bool(a_new[3:].any())


def test_refactorize_is_deterministic_and_refuses_mismatched_factors() -> None:
    b, a = rand(3, (6, 3)), rand(4, (3, 5))
    first, second = refactorize(b, a), refactorize(b.clone(), a.clone())
    assert all(torch.equal(x, y) for x, y in zip(first, second, strict=True))
    with pytest.raises(ValueError, match=r"b \(out, r\) and a \(r, in\), got \(6, 3\) and \(4, 5\)"):
        refactorize(b, rand(5, (4, 5)))


def test_lora_pairs_pairs_peft_names_and_refuses_an_unpaired_factor() -> None:
    assert lora_pairs([B2, A1, "m.ln.weight", A2, B1]) == [(A1, B1), (A2, B2)]
    with pytest.raises(ValueError, match=r"'m\.l1\.lora_B\.default\.weight' has no partner 'm\.l1\.lora_A\.default"):
        lora_pairs([B1, A2, B2])


# ---- FedAvg and FedAvg-LoRA ------------------------------------------------------------------------------
def run_round(protocol: Any, params: Params | RoundAggregator, locals_: list[tuple[float, Params]]
              ) -> tuple[RoundAggregator, Aggregate]:
    """One round over a dense `RoundAggregator` (a new one from `params`, or the one given): the clients'
    updates from `make_update`, weighted; checks that a worker's replica that applies the broadcast aggregate
    equals the aggregator's."""
    agg = params if isinstance(params, RoundAggregator) else dense_aggregator(protocol, params)
    worker = agg.replica
    for i, (weight, local) in enumerate(locals_):
        update, _ = protocol.make_update(local, agg.replica.params, protocol.init_worker_state(local))
        agg.submit(f"c{i}", Update(update.payloads, weight=weight))
    aggregate = agg.close()
    assert_replicas_equal(apply_aggregate(protocol, Downlink("dense"), aggregate, worker), agg.replica)
    return agg, aggregate


def test_fedavg_replica_is_the_sample_weighted_mean_of_client_models() -> None:
    params = {"w": rand(0, (4, 3)), "b": rand(1, (3,))}
    clients = [{n: t + rand(10 + i, t.shape) for n, t in params.items()} for i in range(2)]
    agg, _ = run_round(FedAvg(), params, [(1.0, clients[0]), (3.0, clients[1])])
    for name in params:
        torch.testing.assert_close(agg.replica.params[name], (clients[0][name] + 3 * clients[1][name]) / 4)
    half, _ = run_round(FedAvg(server_lr=0.5), params, [(1.0, clients[0]), (3.0, clients[1])])
    for name, theta in params.items():  # theta - 0.5 * (theta - weighted mean)
        weighted = (clients[0][name] + 3 * clients[1][name]) / 4
        torch.testing.assert_close(half.replica.params[name], (theta + weighted) / 2)


def test_fedavg_lora_averages_factors_separately_which_is_not_the_mean_adapter() -> None:
    a, b = "l.lora_A.default.weight", "l.lora_B.default.weight"
    params = {a: torch.tensor([[1.0]]), b: torch.tensor([[0.0]])}
    clients = [{a: torch.tensor([[1.0]]), b: torch.tensor([[2.0]])},
               {a: torch.tensor([[3.0]]), b: torch.tensor([[0.0]])}]
    agg, _ = run_round(FedAvgLoRA(), params, [(1.0, c) for c in clients])
    product = agg.replica.params[b] @ agg.replica.params[a]
    mean_of_products = sum(c[b] @ c[a] for c in clients) / 2
    assert float(product) == 2.0 and float(mean_of_products) == 1.0  # mean(B) mean(A) = 1 * 2 != (2 + 0) / 2


# ---- FFA-LoRA ----------------------------------------------------------------------------------------------
def test_ffa_lora_never_changes_a_and_sends_only_b() -> None:
    params, protocol = factors(0), FFALoRA()
    agg = dense_aggregator(protocol, params)
    for round_ in range(3):
        clients = [(float(i + 1), {**params, B1: params[B1] + rand(100 * round_ + i, (6, 3)),
                                   B2: params[B2] + rand(50 + 100 * round_ + i, (4, 2))}) for i in range(2)]
        agg, aggregate = run_round(protocol, agg, clients)
        assert set(aggregate.payloads) == {B1, B2}
        expected_b1 = (clients[0][1][B1] + 2 * clients[1][1][B1]) / 3
        torch.testing.assert_close(agg.replica.params[B1], expected_b1)
        assert not torch.equal(agg.replica.params[B1], params[B1])
        assert all(torch.equal(agg.replica.params[n], factors(0)[n]) for n in (A1, A2))  # bit for bit
        params = clone(agg.replica.params)


def test_an_update_carrying_a_or_lacking_b_is_refused_by_name() -> None:
    params, protocol = factors(1), FFALoRA()
    expect = expectation(protocol, Replica(0, params), "dense")
    assert set(expect.shapes) == {B1, B2} and expect.withheld == {A1, A2}
    deltas = {n: rand(7, t.shape) for n, t in params.items()}
    carries_a = r"worker w: update carries tensor\(s\) \['m\.l1\.lora_A\.default\.weight'\], which .* keeps frozen"
    with pytest.raises(UpdateRejected, match=carries_a):
        check_update("w", Update({B1: dense(deltas[B1]), B2: dense(deltas[B2]), A1: dense(deltas[A1])}), expect)
    with pytest.raises(UpdateRejected, match=r"update lacks tensor\(s\) \['m\.l2\.lora_B\.default\.weight'\]"):
        check_update("w", Update({B1: dense(deltas[B1])}), expect)
    assert set(check_update("w", Update({B1: dense(deltas[B1]), B2: dense(deltas[B2])}), expect).tensors) == {B1, B2}


def test_ffa_lora_make_update_refuses_a_locally_trained_a() -> None:
    params, protocol = factors(2), FFALoRA()
    with pytest.raises(ValueError, match=r"'m\.l2\.lora_A\.default\.weight' is frozen on the clients but changed"):
        protocol.make_update({**params, A2: params[A2] + 1e-3}, params, None)


def test_other_protocols_still_expect_every_tensor() -> None:
    params = factors(3)
    for protocol in (FedAvg(), FedAvgLoRA()):
        expect = expectation(protocol, Replica(0, params), "dense")
        assert set(expect.shapes) == set(params) and expect.withheld == frozenset()


# ---- FedSVD ------------------------------------------------------------------------------------------------
def test_fedsvd_round_refactorizes_the_aggregated_b_and_keeps_the_mirror_exact() -> None:
    params, protocol = factors(4), FedSVD()
    agg = dense_aggregator(protocol, params)
    for round_ in range(3):
        weights = (1.0, 2.0, 3.0)
        clients = [{**params, B1: params[B1] + rand(200 + 10 * round_ + i, (6, 3)),
                    B2: params[B2] + rand(300 + 10 * round_ + i, (4, 2))} for i in range(3)]
        agg, aggregate = run_round(protocol, agg, list(zip(weights, clients, strict=True)))
        assert set(aggregate.payloads) == set(params)  # the aggregate moves A and B
        for a, b in ((A1, B1), (A2, B2)):
            mean_delta = sum(w * (params[b] - c[b]) for w, c in zip(weights, clients, strict=True)) / sum(weights)
            target = (params[b] - mean_delta) @ params[a]
            replica = agg.replica.params
            torch.testing.assert_close(replica[b] @ replica[a], target, atol=1e-5, rtol=1e-5)
            assert eye_error(replica[a]) < 1e-5
            assert not torch.allclose(replica[a], params[a])  # A followed the aggregate
        state = agg.state
        assert isinstance(state, FedSVDState) and state.factors.keys() == agg.replica.params.keys()
        assert all(torch.equal(state.factors[n], agg.replica.params[n]) for n in params)  # bit for bit
        params = clone(agg.replica.params)


def test_fedsvd_server_lr_scales_the_mean_of_b_only() -> None:
    params = factors(5)
    client = {**params, B1: params[B1] + rand(9, (6, 3)), B2: params[B2] + rand(10, (4, 2))}
    agg, _ = run_round(FedSVD(server_lr=0.5), params, [(1.0, client)])
    target = (params[B1] + 0.5 * (client[B1] - params[B1])) @ params[A1]
    torch.testing.assert_close(agg.replica.params[B1] @ agg.replica.params[A1], target, atol=1e-5, rtol=1e-5)
    assert agg.replica.momentum == {}  # replicas step theta - u: no outer momentum
    with pytest.raises(ValueError, match="server_lr must be > 0"):
        FedSVD(server_lr=0.0)


def test_fedsvd_needs_lora_factor_pairs() -> None:
    with pytest.raises(ValueError, match="no LoRA factor pairs"):
        dense_aggregator(FedSVD(), {"w": rand(0, (3, 3))})
    with pytest.raises(ValueError, match="has no partner"):
        dense_aggregator(FedSVD(), {A1: rand(0, (3, 5))})


# ---- config ------------------------------------------------------------------------------------------------
LORA = {"method": "lora", "rank": 4, "alpha": 8}


@pytest.mark.parametrize("kind", ["fedavg-lora", "ffa-lora", "fedsvd"])
@pytest.mark.parametrize("lowrank", [None, {"method": "galore", "rank": 4}])
def test_adapter_protocols_need_a_lowrank_block_of_adapters(kind: str, lowrank: dict[str, Any] | None) -> None:
    with pytest.raises(ConfigError, match=rf"protocol\.kind '{kind}' .* needs a lowrank: block with method 'lora'"):
        tiny_config(lowrank=lowrank, protocol={"kind": kind, "inner_steps": 5})
    cfg = tiny_config(lowrank=LORA, protocol={"kind": kind, "inner_steps": 5})
    assert cfg.protocol.kind == kind and cfg.inner_steps == 5


def test_fedavg_trains_every_weight_and_the_frozen_names_are_declared() -> None:
    cfg = tiny_config(protocol={"kind": "fedavg", "inner_steps": 5, "server_lr": 0.5})
    assert cfg.protocol.frozen_in_training == () and getattr(cfg.protocol, "local_epochs") == 1  # noqa: B009
    for kind, frozen in (("fedavg-lora", ()), ("ffa-lora", ("lora_A",)), ("fedsvd", ("lora_A",))):
        assert tiny_config(lowrank=LORA, protocol={"kind": kind}).protocol.frozen_in_training == frozen


@pytest.mark.parametrize("codec", ["int8", "bf16", "topk", "sparse"])
def test_fedsvd_refuses_a_downlink_that_is_not_dense(codec: str) -> None:
    with pytest.raises(ConfigError, match=rf"protocol\.downlink\.codec '{codec}' is not allowed for fedsvd.*dense"):
        tiny_config(lowrank=LORA, protocol={"kind": "fedsvd", "downlink": {"codec": codec}})
    assert tiny_config(lowrank=LORA, protocol={"kind": "fedsvd", "downlink": {"codec": "none"}})
