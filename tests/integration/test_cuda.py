"""Training on a GPU (`cluster.device: cuda`): the model and batches on CUDA, everything a protocol touches on
CPU, and DDP over NCCL. Skipped, with that reason, where torch sees no GPU."""

from __future__ import annotations

import pytest
import torch

from deploy.inproc import run_inproc
from protocols.config import ConfigError, RunConfig, parse_config
from worker.ddp import run_ddp_local
from worker.devices import local_ranks_device, resolve_device
from worker.session import Session

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="no CUDA GPU visible (torch.cuda.is_available() is False)")

SMALL = {
    "name": "cuda-test",
    "seed": 5,
    "model": {"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 32},
    "data": {"batch_size": 8, "max_chars": 60_000},
    "train": {"steps": 8, "warmup_steps": 2, "eval_every_steps": 4, "eval_batches": 2},
}


def _cfg(**sections: object) -> RunConfig:
    return parse_config({**SMALL, **sections})


def test_a_session_trains_on_cuda_and_hands_the_protocol_cpu_tensors() -> None:
    cfg = _cfg(cluster={"device": "cuda", "workers": 2}, protocol={"kind": "diloco", "inner_steps": 4})
    session = Session.build(cfg, 0, 2)
    assert session.device.type == "cuda"
    assert all(p.device.type == "cuda" for p in session.model.parameters())
    before = session.params()
    assert all(t.device.type == "cpu" for t in before.values())
    on_cpu = Session.build(cfg, 0, 2, torch.device("cpu")).params()
    assert all(torch.equal(before[k], on_cpu[k]) for k in before)  # built on CPU from the seed, then moved
    losses = session.trainer.train(3)
    assert all(torch.isfinite(torch.tensor(losses)))
    after = session.params()
    assert all(t.device.type == "cpu" for t in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in before)  # it trained
    session.trainer.load_params(before)  # the replica (CPU) goes back onto the GPU
    assert all(torch.equal(before[k], v) for k, v in session.params().items())
    assert all(p.device.type == "cuda" for p in session.model.parameters())


def test_a_diloco_run_on_cuda_keeps_replicas_identical(tmp_path: object) -> None:
    cfg = _cfg(cluster={"device": "cuda", "workers": 2, "transport": "inproc", "fold_order": "worker"},
               protocol={"kind": "diloco", "inner_steps": 4})
    _, results = run_inproc(cfg, tmp_path)
    assert len(results) == 2 and all(r.rounds == 2 for r in results)
    assert results[0].param_hash == results[1].param_hash != ""
    assert all(r.final_eval_loss is not None for r in results)


def test_ddp_uses_nccl_on_cuda() -> None:
    cfg = _cfg(cluster={"device": "cuda", "workers": 1}, protocol={"kind": "ddp"})
    [summary] = run_ddp_local(cfg, world_size=1)
    assert summary["backend"] == "nccl"
    assert summary["steps"] == 8


def test_local_nccl_ranks_need_a_gpu_each() -> None:
    ranks = torch.cuda.device_count()
    fits = _cfg(cluster={"device": "cuda", "workers": ranks}, protocol={"kind": "ddp"})
    assert local_ranks_device(fits, "auto", ranks).cluster.device == "cuda"
    too_many = _cfg(cluster={"device": "cuda", "workers": ranks + 1}, protocol={"kind": "ddp"})
    with pytest.raises(ConfigError, match=rf"NCCL needs a GPU per rank: {ranks + 1} ranks"):
        local_ranks_device(too_many, "auto", ranks + 1)
    auto = _cfg(cluster={"device": "auto", "workers": ranks + 1}, protocol={"kind": "ddp"})
    assert local_ranks_device(auto, "auto", ranks + 1).cluster.device == "cpu"  # auto never fails
    assert local_ranks_device(too_many, "gloo", ranks + 1).cluster.device == "cuda"  # gloo ranks may share


def test_workers_spread_over_the_visible_gpus() -> None:
    count = torch.cuda.device_count()
    assert [resolve_device("cuda", i) for i in range(count + 1)] == [
        *(torch.device("cuda", i) for i in range(count)), torch.device("cuda", 0)]
    assert resolve_device("auto", 1) == torch.device("cuda", 1 % count)
