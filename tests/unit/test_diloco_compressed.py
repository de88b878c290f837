"""DiLoCo with a `compression:` block: codec "none" is exactly dense DiLoCo; int8 pseudo-gradients
average close to the dense mean; error-feedback state lives on the worker across rounds; with EF21 the
aggregator's per-worker shifts are the workers' own."""

from __future__ import annotations

import pickle

import pytest
import torch

from compression import registry
from compression.error_feedback import ErrorFeedback
from compression.payload import dense, dense_values
from protocols.base import MeanAccumulator, Update
from protocols.compressed import Compression, WorkerShifts
from protocols.config import CompressionConfig, load_config
from protocols.diloco import DiLoCo, DiLoCoConfig
from protocols.downlink import Downlink
from protocols.outer import nesterov_sgd
from protocols.registry import build_protocol
from protocols.replica import Params, Replica
from protocols.round import RoundAggregator
from tests.unit.protocol_helpers import dense_aggregator, fold

DOWNLINK_FROM_PAPER = DiLoCoConfig().downlink  # codec "auto": DiLoCo's paper sends the aggregate dense


def _random(seed: int, scale: float = 1.0) -> Params:
    gen = torch.Generator().manual_seed(seed)
    return {"w": scale * torch.randn(64, 96, generator=gen), "b": scale * torch.randn(96, generator=gen)}


def _locals(global_: Params, round_: int, workers: int) -> list[Params]:
    return [
        {n: t - d for (n, t), d in zip(global_.items(), _random(100 * round_ + k, 0.01).values(), strict=True)}
        for k in range(workers)
    ]


def test_codec_none_without_feedback_is_bit_identical_to_dense_diloco() -> None:
    protocol = DiLoCo.from_settings(DiLoCoConfig())
    downlink = Downlink.from_config(DOWNLINK_FROM_PAPER, protocol)
    assert downlink.mode == "dense"
    aggregator = RoundAggregator(protocol, downlink, Replica(0, _random(0)))
    worker_states = [protocol.init_worker_state(aggregator.replica.params) for _ in range(3)]
    assert worker_states == [None, None, None]
    reference: Params = {n: t.clone() for n, t in aggregator.replica.params.items()}
    momentum: Params = {}
    for r in range(3):
        replica = aggregator.replica
        locals_ = _locals(replica.params, r, 3)
        # The dense DiLoCo round, spelled out: dense payloads, weighted mean, torch's Nesterov SGD.
        ref_acc = MeanAccumulator()
        for k, local in enumerate(locals_):
            update, worker_states[k] = protocol.make_update(local, replica.params, worker_states[k])
            for name, payload in update.payloads.items():
                assert payload.codec == "dense"
                assert torch.equal(dense_values(payload), replica.params[name] - local[name])
            aggregator.submit(f"w{k}", update)
            fold(protocol, replica, ref_acc, f"w{k}",
                 Update(payloads={n: dense(reference[n] - t) for n, t in local.items()}))
        aggregator.close()
        reference, momentum = nesterov_sgd(reference, ref_acc.mean(), momentum, lr=0.7, momentum=0.9)
        for name in reference:
            assert torch.equal(aggregator.replica.params[name], reference[name])
            assert torch.equal(aggregator.replica.momentum[name], momentum[name])
    assert aggregator.state is None  # no shifts to keep without error feedback
    assert worker_states == [None, None, None]


def test_int8_pseudo_gradients_are_int8_on_the_wire_and_average_close_to_the_dense_mean() -> None:
    cfg = load_config(None, ["protocol.compression.codec=int8"])
    protocol, dense_protocol = build_protocol(cfg), DiLoCo()
    replica = Replica(0, _random(0))
    locals_ = _locals(replica.params, 0, 4)
    acc, dense_acc = protocol.new_round(), dense_protocol.new_round()
    for k, local in enumerate(locals_):
        update, _ = protocol.make_update(local, replica.params, protocol.init_worker_state(replica.params))
        for payload in update.payloads.values():
            assert payload.codec == "int8" and payload.dtype == torch.float32
            assert payload.tensors["codes"].dtype == torch.int8  # one byte per entry on the wire
        dense_update, _ = dense_protocol.make_update(local, replica.params, None)
        assert update.nbytes() < 0.26 * dense_update.nbytes()
        fold(protocol, replica, acc, f"w{k}", update)
        fold(dense_protocol, replica, dense_acc, f"w{k}", dense_update)
    assert isinstance(acc, MeanAccumulator) and isinstance(dense_acc, MeanAccumulator)
    pseudo = [{n: replica.params[n] - t for n, t in local.items()} for local in locals_]
    for name, mean in acc.mean().items():
        exact = dense_acc.mean()[name]
        # Per-chunk absmax int8: each entry within half a step (max|x| / 127 / 2) of its value.
        assert (mean - exact).abs().max() <= 0.5 * max(d[name].abs().max() for d in pseudo) / 127
        assert not torch.equal(mean, exact)


def test_worker_error_feedback_state_persists_across_rounds() -> None:
    protocol = DiLoCo(compression=Compression(codec="topk", error_feedback="ef14", params={"density": 0.05}))
    global_ = _random(0)
    state = protocol.init_worker_state(global_)
    assert isinstance(state, ErrorFeedback)
    carried = {n: torch.zeros_like(t) for n, t in global_.items()}
    for r in range(3):
        (local,) = _locals(global_, r, 1)
        update, new_state = protocol.make_update(local, global_, state)
        assert new_state is state  # the round loop hands it back next round
        for name, payload in update.payloads.items():
            delta = global_[name] - local[name]
            residual = state.residual(name)
            assert residual is not None
            # EF14 (decay 1) conserves: sent + new residual == this round's delta + the carried residual.
            torch.testing.assert_close(registry.decode(payload) + residual, delta + carried[name], rtol=0, atol=1e-6)
            assert residual.abs().sum() > 0  # top-5% leaves most of it behind
            carried[name] = residual.clone()
    with pytest.raises(TypeError, match="ErrorFeedback from init_worker_state"):
        protocol.make_update(local, global_, None)


def test_ef21_aggregator_keeps_each_workers_shift_and_steps_with_their_mean() -> None:
    cfg = DiLoCoConfig(compression=CompressionConfig(codec="topk", density=0.1, error_feedback="ef21"),
                       outer_lr=1.0, outer_momentum=0.0)
    protocol = DiLoCo.from_settings(cfg)
    aggregator = dense_aggregator(protocol, _random(0))
    workers = [protocol.init_worker_state(aggregator.replica.params) for _ in range(3)]
    assert all(isinstance(w, ErrorFeedback) for w in workers)
    for r in range(3):
        before = aggregator.replica
        for k, local in enumerate(_locals(before.params, r, 3)):
            update, workers[k] = protocol.make_update(local, before.params, workers[k])
            aggregator.submit(f"w{k}", update)
        aggregator.close()
        server = aggregator.state
        assert isinstance(server, WorkerShifts) and sorted(server.shifts) == ["w0", "w1", "w2"]
        for name in before.params:
            shifts = [w.shift(name) for w in workers if isinstance(w, ErrorFeedback)]
            assert len(shifts) == 3 and all(s is not None for s in shifts)
            for k, shift in enumerate(shifts):
                torch.testing.assert_close(server.shifts[f"w{k}"][name], shift, rtol=0, atol=1e-6)
            mean_shift = torch.stack([s for s in shifts if s is not None]).mean(0)
            torch.testing.assert_close(server.mean()[name], mean_shift, rtol=0, atol=1e-6)
            # Outer SGD lr 1, no momentum: the replica moved by exactly the mean shift.
            moved = before.params[name] - aggregator.replica.params[name]
            torch.testing.assert_close(moved, mean_shift, rtol=0, atol=1e-6)


def test_compressed_protocol_and_worker_state_pickle() -> None:
    protocol = pickle.loads(pickle.dumps(build_protocol(load_config(None, ["protocol.compression.codec=int8"]))))
    global_ = _random(0)
    state = protocol.init_worker_state(global_)
    update, state = protocol.make_update(_locals(global_, 0, 1)[0], global_, state)
    assert pickle.loads(pickle.dumps(update)).payloads["w"].codec == "int8"
    assert pickle.loads(pickle.dumps(state)).state_dict().keys() == {"error", "shift"}
    with pytest.raises(ValueError, match="unknown codec 'zip'"):
        Compression(codec="zip")
