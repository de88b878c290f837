"""DiLoCo (arXiv:2311.08105) identities: one worker with H=1 and a unit outer SGD step is plain training;
the outer step is torch's Nesterov SGD on the weighted mean of the pseudo-gradients."""

from __future__ import annotations

import pickle
from collections.abc import Callable

import pytest
import torch

from compression.payload import Payload, dense, dense_values
from protocols.base import MeanAccumulator, Update
from protocols.config import CompressionConfig, DiLoCoConfig
from protocols.diloco import DiLoCo, DiLoCoServerState

Params = dict[str, torch.Tensor]


def _mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))


def _batches(steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(32, 6, generator=gen), torch.randn(32, 1, generator=gen)) for _ in range(steps)]


def _train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    opt.step()


def _snapshot(model: torch.nn.Module) -> Params:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


OPTIMIZERS: dict[str, Callable[[torch.nn.Module], torch.optim.Optimizer]] = {
    "sgd": lambda m: torch.optim.SGD(m.parameters(), lr=0.05),
    "adamw": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1),
}


@pytest.mark.parametrize("inner", sorted(OPTIMIZERS))
def test_one_worker_h1_unit_outer_sgd_is_plain_training(inner: str) -> None:
    steps = 15
    plain = _mlp()
    plain_opt = OPTIMIZERS[inner](plain)
    worker = _mlp()
    worker_opt = OPTIMIZERS[inner](worker)  # inner optimizer state persists on the worker across rounds
    protocol = DiLoCo(outer_lr=1.0, outer_momentum=0.0)
    global_ = _snapshot(worker)
    server_state = protocol.init_server_state(global_)
    worker_state = protocol.init_worker_state(global_)
    for x, y in _batches(steps):
        _train_step(plain, plain_opt, x, y)
        with torch.no_grad():  # pull: the worker loads the global parameters
            for name, p in worker.named_parameters():
                p.copy_(global_[name])
        _train_step(worker, worker_opt, x, y)
        update, worker_state = protocol.make_update(_snapshot(worker), global_, worker_state)
        acc = protocol.new_round(global_)
        acc.fold("w0", update)
        global_, server_state = protocol.aggregate(global_, acc, server_state)
        for name, p in plain.named_parameters():
            torch.testing.assert_close(global_[name], p.detach(), rtol=0, atol=1e-6)
    assert server_state.outer_steps == steps


def _workers_round(protocol: DiLoCo, global_: Params, deltas: list[Params], weights: list[float]) -> MeanAccumulator:
    """Fold K workers whose local parameters sit at `global_ - delta`."""
    acc = protocol.new_round(global_)
    for k, (delta, weight) in enumerate(zip(deltas, weights, strict=True)):
        local = {name: global_[name] - d for name, d in delta.items()}
        update, _ = protocol.make_update(local, global_, None)
        update.weight = weight
        acc.fold(f"w{k}", update)
    return acc


def _random(seed: int) -> Params:
    gen = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(5, 4, generator=gen), "b": torch.randn(4, generator=gen)}


def test_outer_step_is_torch_nesterov_sgd_on_the_weighted_mean_across_rounds() -> None:
    protocol = DiLoCo()  # paper defaults: lr 0.7, momentum 0.9, Nesterov
    global_ = _random(0)
    reference = {name: torch.nn.Parameter(t.clone()) for name, t in global_.items()}
    opt = torch.optim.SGD(list(reference.values()), lr=0.7, momentum=0.9, nesterov=True)
    state = protocol.init_server_state(global_)
    weights = [1.0, 3.0, 0.5]
    for r in range(4):
        deltas = [_random(10 * r + k + 1) for k in range(len(weights))]
        acc = _workers_round(protocol, global_, deltas, weights)
        total = sum(weights)
        expected_mean = {
            n: torch.stack([w * d[n] for w, d in zip(weights, deltas, strict=True)]).sum(0) / total for n in global_
        }
        for name, mean in acc.mean().items():
            torch.testing.assert_close(mean, expected_mean[name], rtol=1e-5, atol=1e-6)
        for name, p in reference.items():
            p.grad = expected_mean[name].clone()
        opt.step()
        global_, state = protocol.aggregate(global_, acc, state)
        for name, p in reference.items():
            torch.testing.assert_close(global_[name], p.detach(), rtol=1e-5, atol=1e-6)
            # The momentum buffer carried in the server state is torch's own.
            torch.testing.assert_close(state.momentum[name], opt.state[p]["momentum_buffer"])
    assert state.outer_steps == 4


def test_tensors_nobody_sent_keep_value_and_momentum() -> None:
    protocol = DiLoCo()
    global_ = _random(0)
    state = DiLoCoServerState(momentum={"b": torch.ones(4)})
    acc = protocol.new_round(global_)
    local = {"w": global_["w"] - 1.0}  # this worker trained only "w"
    update, _ = protocol.make_update(local, global_, None)
    assert set(update.payloads) == {"w"}
    acc.fold("w0", update)
    new_global, new_state = protocol.aggregate(global_, acc, state)
    assert torch.equal(new_global["b"], global_["b"])
    assert torch.equal(new_state.momentum["b"], torch.ones(4))
    assert not torch.equal(new_global["w"], global_["w"])


def test_aggregate_mutates_nothing_and_returns_fresh_tensors() -> None:
    protocol = DiLoCo()
    global_ = _random(0)
    state = protocol.aggregate(
        global_, _workers_round(protocol, global_, [_random(1)], [1.0]), protocol.init_server_state(global_)
    )[1]
    before_global = {n: t.clone() for n, t in global_.items()}
    before_momentum = {n: t.clone() for n, t in state.momentum.items()}
    acc = _workers_round(protocol, global_, [_random(2), _random(3)], [1.0, 2.0])
    new_global, new_state = protocol.aggregate(global_, acc, state)
    for name in global_:
        assert torch.equal(global_[name], before_global[name])
        assert torch.equal(state.momentum[name], before_momentum[name])
        assert new_global[name].data_ptr() != global_[name].data_ptr()
    assert state.outer_steps == 1 and new_state.outer_steps == 2
    new_global["w"].add_(1.0)  # writing into the result cannot reach the caller's tensors
    assert torch.equal(global_["w"], before_global["w"])


def test_make_update_sends_global_minus_local_dense_by_default() -> None:
    global_, local = _random(0), _random(1)
    update, state = DiLoCo().make_update(local, global_, "kept")
    assert state == "kept"
    for name in global_:
        assert update.payloads[name].codec == "dense"
        assert torch.equal(dense_values(update.payloads[name]), global_[name] - local[name])


def test_pluggable_encode_and_decode_carry_the_pseudo_gradient() -> None:
    seen: list[str] = []

    def encode(name: str, tensor: torch.Tensor) -> Payload:
        seen.append(name)
        return dense(tensor.to(torch.float16))

    def decode(payload: Payload) -> torch.Tensor:
        return dense_values(payload).to(torch.float32)

    protocol = DiLoCo(outer_lr=1.0, outer_momentum=0.0, encode=encode, decode=decode)
    global_ = {"x": torch.tensor([1.0, 2.0])}
    update, _ = protocol.make_update({"x": torch.tensor([0.5, 2.25])}, global_, None)
    assert seen == ["x"] and update.payloads["x"].dtype == torch.float16
    acc = protocol.new_round(global_)
    acc.fold("w0", update)
    new_global, _ = protocol.aggregate(global_, acc, protocol.init_server_state(global_))
    assert torch.equal(new_global["x"], torch.tensor([0.5, 2.25]))


def test_bad_input_raises_a_clear_error() -> None:
    protocol = DiLoCo()
    global_ = _random(0)
    with pytest.raises(ValueError, match="'z' is not among the global"):
        protocol.make_update({"z": torch.zeros(1)}, global_, None)
    with pytest.raises(ValueError, match="local tensor 'b'"):
        protocol.make_update({"b": torch.zeros(5)}, global_, None)
    with pytest.raises(ValueError, match="no updates"):
        protocol.aggregate(global_, protocol.new_round(global_), protocol.init_server_state(global_))
    with pytest.raises(TypeError, match="DiLoCoServerState"):
        protocol.aggregate(global_, protocol.new_round(global_), None)
    with pytest.raises(ValueError, match="outer_momentum"):
        DiLoCo(outer_momentum=1.0)
    stray = protocol.new_round(global_)
    stray.fold("w0", Update(payloads={"z": dense(torch.zeros(2))}))
    with pytest.raises(ValueError, match=r"not parameters: \['z'\]"):
        protocol.aggregate(global_, stray, protocol.init_server_state(global_))


def test_from_config_uses_the_config_and_wires_compression() -> None:
    protocol = DiLoCo.from_config(DiLoCoConfig(outer_lr=0.5, outer_momentum=0.8, nesterov=False))
    assert (protocol.outer_lr, protocol.outer_momentum, protocol.nesterov) == (0.5, 0.8, False)
    assert protocol.compression.is_identity
    compressed = DiLoCo.from_config(DiLoCoConfig(compression=CompressionConfig(codec="int8", error_feedback="ef14")))
    assert (compressed.compression.codec, compressed.compression.error_feedback) == ("int8", "ef14")
    with pytest.raises(ValueError, match="codec='int8'"):
        DiLoCo(encode=lambda name, t: dense(t), compression=compressed.compression)


def test_protocol_and_accumulator_pickle_with_default_codecs() -> None:
    # Ray ships the protocol to actors and checkpoints may hold an open round: both must pickle.
    protocol = pickle.loads(pickle.dumps(DiLoCo()))
    global_ = _random(0)
    acc = pickle.loads(pickle.dumps(_workers_round(protocol, global_, [_random(1)], [2.0])))
    assert acc.count == 1 and acc.total_weight == 2.0
    new_global, _ = protocol.aggregate(global_, acc, protocol.init_server_state(global_))
    assert set(new_global) == set(global_)
