"""DiLoCo (arXiv:2311.08105) identities: one worker with H=1 and a unit outer SGD step is plain training;
the outer step is torch's Nesterov SGD on the weighted mean of the pseudo-gradients."""

from __future__ import annotations

import pickle
from collections.abc import Callable

import pytest
import torch

from compression.payload import dense, dense_values
from protocols.base import MeanAccumulator, Update
from protocols.compressed import ShiftAccumulator
from protocols.config import CompressionConfig
from protocols.diloco import DiLoCo, DiLoCoConfig
from protocols.replica import Params, Replica
from protocols.round import UpdateRejected
from tests.unit.protocol_helpers import dense_aggregator, fold, locals_from

# ---- one worker, H = 1, outer SGD lr 1 without momentum == plain training ----------------------------


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
    aggregator = dense_aggregator(protocol, _snapshot(worker))
    worker_state = protocol.init_worker_state(aggregator.replica.params)
    for x, y in _batches(steps):
        _train_step(plain, plain_opt, x, y)
        with torch.no_grad():  # pull: the worker loads the global parameters
            for name, p in worker.named_parameters():
                p.copy_(aggregator.replica.params[name])
        _train_step(worker, worker_opt, x, y)
        update, worker_state = protocol.make_update(_snapshot(worker), aggregator.replica.params, worker_state)
        aggregator.submit("w0", update)
        aggregator.close()
        for name, p in plain.named_parameters():
            torch.testing.assert_close(aggregator.replica.params[name], p.detach(), rtol=0, atol=1e-6)
    assert aggregator.replica.outer_steps == steps and aggregator.round == steps


# ---- the outer step is torch.optim.SGD(nesterov=True) on the weighted mean ----------------------------


def _random(seed: int) -> Params:
    gen = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(5, 4, generator=gen), "b": torch.randn(4, generator=gen)}


def _update(protocol: DiLoCo, params: Params, delta: Params, weight: float = 1.0) -> Update:
    """The update of a worker whose local parameters sit at `params - delta`."""
    update, _ = protocol.make_update(locals_from(params, delta), params, None)
    update.weight = weight
    return update


def test_outer_step_is_torch_nesterov_sgd_on_the_weighted_mean_across_rounds() -> None:
    protocol = DiLoCo()  # paper defaults: lr 0.7, momentum 0.9, Nesterov
    aggregator = dense_aggregator(protocol, _random(0))
    reference = {name: torch.nn.Parameter(t.clone()) for name, t in aggregator.replica.params.items()}
    opt = torch.optim.SGD(list(reference.values()), lr=0.7, momentum=0.9, nesterov=True)
    weights = [1.0, 3.0, 0.5]
    for r in range(4):
        params = aggregator.replica.params
        deltas = [_random(10 * r + k + 1) for k in range(len(weights))]
        for k, (delta, weight) in enumerate(zip(deltas, weights, strict=True)):
            aggregator.submit(f"w{k}", _update(protocol, params, delta, weight))
        expected_mean = {
            n: torch.stack([w * d[n] for w, d in zip(weights, deltas, strict=True)]).sum(0) / sum(weights)
            for n in params
        }
        assert isinstance(aggregator.acc, MeanAccumulator)
        for name, mean in aggregator.acc.mean().items():
            torch.testing.assert_close(mean, expected_mean[name], rtol=1e-5, atol=1e-6)
        for name, p in reference.items():
            p.grad = expected_mean[name].clone()
        opt.step()
        aggregator.close()
        for name, p in reference.items():
            torch.testing.assert_close(aggregator.replica.params[name], p.detach(), rtol=1e-5, atol=1e-6)
            # The momentum buffer carried in the replica is torch's own.
            torch.testing.assert_close(aggregator.replica.momentum[name], opt.state[p]["momentum_buffer"])
    assert aggregator.replica.outer_steps == 4


def test_tensors_without_an_update_keep_value_and_momentum() -> None:
    # A round folds whole updates only (check_update refuses a partial one, see test_round_check), so a
    # tensor without an update can only reach `apply`; it must leave that tensor and its momentum alone.
    protocol = DiLoCo()
    replica = Replica(0, _random(0), momentum={"b": torch.ones(4)})
    partial, _ = protocol.make_update({"w": replica.params["w"] - 1.0}, replica.params, None)
    assert set(partial.payloads) == {"w"}  # a worker sends what it trained
    with pytest.raises(UpdateRejected, match=r"lacks tensor\(s\) \['b'\]"):
        dense_aggregator(protocol, replica.params).submit("w0", partial)
    after = protocol.apply({"w": torch.ones(5, 4)}, replica)
    assert torch.equal(after.params["b"], replica.params["b"])
    assert torch.equal(after.momentum["b"], torch.ones(4))
    assert not torch.equal(after.params["w"], replica.params["w"])


def test_apply_mutates_nothing_and_returns_fresh_tensors() -> None:
    protocol = DiLoCo()
    aggregator = dense_aggregator(protocol, _random(0))
    aggregator.submit("w0", _update(protocol, aggregator.replica.params, _random(1)))
    aggregator.close()
    replica = aggregator.replica  # one outer step taken: momentum buffers exist
    before = {part: {n: t.clone() for n, t in getattr(replica, part).items()} for part in ("params", "momentum")}
    for k, seed in enumerate((2, 3)):
        aggregator.submit(f"w{k}", _update(protocol, replica.params, _random(seed), weight=k + 1.0))
    aggregator.close()
    new = aggregator.replica
    for part, tensors in before.items():
        for name, old in tensors.items():
            assert torch.equal(getattr(replica, part)[name], old)
            assert getattr(new, part)[name].data_ptr() != getattr(replica, part)[name].data_ptr()
    assert replica.outer_steps == 1 and new.outer_steps == 2
    new.params["w"].add_(1.0)  # writing into the result cannot reach the previous replica's tensors
    assert torch.equal(replica.params["w"], before["params"]["w"])


def test_make_update_sends_global_minus_local_dense_by_default() -> None:
    global_, local = _random(0), _random(1)
    update, state = DiLoCo().make_update(local, global_, "kept")
    assert state == "kept"
    for name in global_:
        assert update.payloads[name].codec == "dense"
        assert torch.equal(dense_values(update.payloads[name]), global_[name] - local[name])


def test_bad_input_raises_a_clear_error() -> None:
    protocol = DiLoCo()
    replica = Replica(0, _random(0))
    with pytest.raises(ValueError, match="'z' is not among the global"):
        protocol.make_update({"z": torch.zeros(1)}, replica.params, None)
    with pytest.raises(ValueError, match="local tensor 'b'"):
        protocol.make_update({"b": torch.zeros(5)}, replica.params, None)
    with pytest.raises(ValueError, match="no updates"):
        protocol.close(protocol.new_round(), protocol.init_aggregator_state(replica))
    with pytest.raises(ValueError, match="round 0 has no updates to close"):
        dense_aggregator(protocol, replica.params).close()
    with pytest.raises(TypeError, match="MeanAccumulator"):
        protocol.close(ShiftAccumulator(), None)
    with pytest.raises(ValueError, match="outer_momentum"):
        DiLoCo(outer_momentum=1.0)
    stray = Update(payloads={**_update(protocol, replica.params, _random(1)).payloads, "z": dense(torch.zeros(2))})
    with pytest.raises(UpdateRejected, match=r"unknown tensor name\(s\) \['z'\]"):
        dense_aggregator(protocol, replica.params).submit("w0", stray)
    with pytest.raises(ValueError, match=r"not parameters: \['z'\]"):
        protocol.apply({"z": torch.zeros(2)}, replica)


def test_from_settings_uses_the_config_and_wires_compression() -> None:
    protocol = DiLoCo.from_settings(DiLoCoConfig(outer_lr=0.5, outer_momentum=0.8, nesterov=False))
    assert (protocol.outer_lr, protocol.outer_momentum, protocol.nesterov) == (0.5, 0.8, False)
    assert protocol.compression.is_identity and protocol.uplink_codec == "dense"
    compressed = DiLoCo.from_settings(
        DiLoCoConfig(compression=CompressionConfig(codec="int8", error_feedback="ef14"))
    )
    assert (compressed.compression.codec, compressed.compression.error_feedback) == ("int8", "ef14")
    assert compressed.uplink_codec == "int8"
    assert DiLoCo.settings is DiLoCoConfig and DiLoCo.kind == "diloco"


def test_protocol_and_accumulator_pickle() -> None:
    # Ray ships the protocol to actors and checkpoints may hold an open round: both must pickle.
    protocol = pickle.loads(pickle.dumps(DiLoCo()))
    replica = Replica(0, _random(0))
    acc = protocol.new_round()
    update = _update(protocol, replica.params, _random(1), weight=2.0)
    fold(protocol, replica, acc, "w0", update)
    acc = pickle.loads(pickle.dumps(acc))
    assert acc.count == 1 and isinstance(acc, MeanAccumulator) and acc.total_weight == 2.0
    mean, state = protocol.close(acc, protocol.init_aggregator_state(replica))
    after = pickle.loads(pickle.dumps(protocol.apply(mean, replica)))
    assert set(after.params) == set(replica.params) and state is None
    assert after.round == 1 and after.digest() == protocol.apply(mean, replica).digest()
