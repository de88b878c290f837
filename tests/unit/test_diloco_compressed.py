"""DiLoCo with a `compression:` block: codec "none" is exactly dense DiLoCo; int8 pseudo-gradients
average close to the dense mean; error-feedback state lives on the worker across rounds."""

from __future__ import annotations

import pickle

import pytest
import torch

from compression import registry
from compression.error_feedback import ErrorFeedback
from compression.payload import dense, dense_values
from protocols.base import MeanAccumulator
from protocols.compressed import Compression
from protocols.config import CompressionConfig, DiLoCoConfig, load_config
from protocols.diloco import DiLoCo, DiLoCoServerState
from protocols.outer import nesterov_sgd
from protocols.registry import build_protocol

Params = dict[str, torch.Tensor]


def _random(seed: int, scale: float = 1.0) -> Params:
    gen = torch.Generator().manual_seed(seed)
    return {"w": scale * torch.randn(64, 96, generator=gen), "b": scale * torch.randn(96, generator=gen)}


def _locals(global_: Params, round_: int, workers: int) -> list[Params]:
    return [
        {n: t - d for (n, t), d in zip(global_.items(), _random(100 * round_ + k, 0.01).values(), strict=True)}
        for k in range(workers)
    ]


def test_codec_none_without_feedback_is_bit_identical_to_dense_diloco() -> None:
    protocol = DiLoCo.from_config(DiLoCoConfig())
    global_ = _random(0)
    state = protocol.init_server_state(global_)
    worker_states = [protocol.init_worker_state(global_) for _ in range(3)]
    assert worker_states == [None, None, None]
    reference: Params = {n: t.clone() for n, t in global_.items()}
    momentum: Params = {}
    for r in range(3):
        locals_ = _locals(global_, r, 3)
        acc = protocol.new_round(global_)
        # The dense DiLoCo round, spelled out: dense payloads, weighted mean, torch's Nesterov SGD.
        ref_acc = MeanAccumulator(decode=dense_values)
        for k, local in enumerate(locals_):
            update, worker_states[k] = protocol.make_update(local, global_, worker_states[k])
            for name, payload in update.payloads.items():
                assert payload.codec == "dense"
                assert torch.equal(dense_values(payload), global_[name] - local[name])
            acc.fold(f"w{k}", update)
            ref_acc.fold(f"w{k}", type(update)(payloads={n: dense(reference[n] - t) for n, t in local.items()}))
        global_, state = protocol.aggregate(global_, acc, state)
        reference, momentum = nesterov_sgd(reference, ref_acc.mean(), momentum, lr=0.7, momentum=0.9)
        for name in global_:
            assert torch.equal(global_[name], reference[name])
            assert torch.equal(state.momentum[name], momentum[name])
    assert isinstance(state, DiLoCoServerState) and state.shift == {}
    assert worker_states == [None, None, None]


def test_int8_pseudo_gradients_are_int8_on_the_wire_and_average_close_to_the_dense_mean() -> None:
    cfg = load_config(None, ["protocol.compression.codec=int8"])
    protocol, dense_protocol = build_protocol(cfg), DiLoCo()
    global_ = _random(0)
    locals_ = _locals(global_, 0, 4)
    acc, dense_acc = protocol.new_round(global_), dense_protocol.new_round(global_)
    for k, local in enumerate(locals_):
        update, _ = protocol.make_update(local, global_, protocol.init_worker_state(global_))
        for payload in update.payloads.values():
            assert payload.codec == "int8" and payload.dtype == torch.float32
            assert payload.tensors["codes"].dtype == torch.int8  # one byte per entry on the wire
        dense_update, _ = dense_protocol.make_update(local, global_, None)
        assert update.nbytes() < 0.26 * dense_update.nbytes()
        acc.fold(f"w{k}", update)
        dense_acc.fold(f"w{k}", dense_update)
    assert isinstance(acc, MeanAccumulator) and isinstance(dense_acc, MeanAccumulator)
    for name, mean in acc.mean().items():
        exact = dense_acc.mean()[name]
        # Per-chunk absmax int8: each entry within half a step (max|x| / 127 / 2) of its value.
        assert (mean - exact).abs().max() <= 0.5 * max(d[name].abs().max() for d in _pseudo(global_, locals_)) / 127
        assert not torch.equal(mean, exact)


def _pseudo(global_: Params, locals_: list[Params]) -> list[Params]:
    return [{n: global_[n] - t for n, t in local.items()} for local in locals_]


def test_worker_error_feedback_state_persists_across_rounds() -> None:
    protocol = DiLoCo(compression=Compression(codec="topk", error_feedback="ef14", params={"density": 0.05}))
    global_ = _random(0)
    state = protocol.init_worker_state(global_)
    assert isinstance(state, ErrorFeedback)
    carried = {n: torch.zeros_like(t) for n, t in global_.items()}
    for r in range(3):
        (local,) = _locals(global_, r, 1)
        update, new_state = protocol.make_update(local, global_, state)
        assert new_state is state  # the runtime hands it back next round
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


def test_ef21_coordinator_shift_tracks_the_mean_of_worker_shifts() -> None:
    cfg = DiLoCoConfig(compression=CompressionConfig(codec="topk", density=0.1, error_feedback="ef21"))
    protocol = DiLoCo.from_config(cfg)
    global_ = _random(0)
    server = protocol.init_server_state(global_)
    workers = [protocol.compression.new_feedback() for _ in range(3)]
    for r in range(3):
        acc = protocol.new_round(global_)
        for k, local in enumerate(_locals(global_, r, 3)):
            update, _ = protocol.make_update(local, global_, workers[k])
            acc.fold(f"w{k}", update)
        global_, server = protocol.aggregate(global_, acc, server)
        for name in global_:
            shifts = [w.shift(name) for w in workers]
            mean_shift = torch.stack([s for s in shifts if s is not None]).mean(0)
            assert len(shifts) == 3
            torch.testing.assert_close(server.shift[name], mean_shift, rtol=0, atol=1e-6)


def test_compressed_protocol_and_worker_state_pickle() -> None:
    protocol = pickle.loads(pickle.dumps(build_protocol(load_config(None, ["protocol.compression.codec=int8"]))))
    global_ = _random(0)
    state = protocol.init_worker_state(global_)
    update, state = protocol.make_update(_locals(global_, 0, 1)[0], global_, state)
    assert pickle.loads(pickle.dumps(update)).payloads["w"].codec == "int8"
    with pytest.raises(ValueError, match="unknown codec 'zip'"):
        Compression(codec="zip")
