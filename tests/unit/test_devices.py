"""`cluster.device`: how a worker resolves it (worker/devices.py) and how `lowband run` turns it into Ray
actor options (deploy/gpus.py). The CUDA side runs in tests/integration/test_cuda.py where a GPU exists."""

from __future__ import annotations

import pytest
import torch

from deploy.gpus import DevicePlan, actor_options, plan_devices, with_device
from protocols.config import ConfigError, RunConfig, parse_config
from worker.devices import local_ranks_device, resolve_backend, resolve_device

NO_GPU_HERE = pytest.mark.skipif(torch.cuda.is_available(), reason="asserts what happens on a machine without a GPU")


def _cfg(device: str = "auto", workers: int = 4, transport: str = "grpc", protocol: dict | None = None) -> RunConfig:
    return parse_config({"cluster": {"device": device, "workers": workers, "transport": transport},
                         "protocol": protocol or {"kind": "diloco"}})


def test_device_field_defaults_to_auto_and_names_itself_when_wrong() -> None:
    assert RunConfig().cluster.device == "auto"
    assert _cfg("cuda").cluster.device == "cuda"
    with pytest.raises(ConfigError, match=r"cluster\.device.*'auto'.*'cpu'.*'cuda'"):
        _cfg("tpu")


@NO_GPU_HERE
def test_auto_resolves_to_cpu_without_a_gpu_and_cuda_is_refused_clearly() -> None:
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu", index=3) == torch.device("cpu")
    with pytest.raises(ConfigError, match=r"cluster\.device is 'cuda' but this process sees no CUDA GPU"):
        resolve_device("cuda")


def test_an_unknown_device_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"cluster\.device must be"):
        resolve_device("gpu")


def test_backend_follows_the_device() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)  # a device object needs no GPU to exist
    assert resolve_backend("auto", cpu) == "gloo"
    assert resolve_backend("auto", cuda) == "nccl"
    assert resolve_backend("gloo", cuda) == "gloo"
    assert resolve_backend("nccl", cuda) == "nccl"
    with pytest.raises(ConfigError, match=r"protocol\.backend 'nccl' needs the ranks on CUDA"):
        resolve_backend("nccl", cpu)
    with pytest.raises(ConfigError, match=r"protocol\.backend must be"):
        resolve_backend("mpi", cpu)


@NO_GPU_HERE
def test_locally_spawned_ranks_get_a_concrete_device() -> None:
    for backend in ("auto", "gloo"):
        assert local_ranks_device(_cfg("auto", protocol={"kind": "ddp"}), backend, 4).cluster.device == "cpu"
    with pytest.raises(ConfigError, match="sees no CUDA GPU"):
        local_ranks_device(_cfg("cuda", protocol={"kind": "ddp"}), "auto", 4)


def test_cpu_and_auto_without_gpus_ask_ray_for_none() -> None:
    for cfg, gpus in ((_cfg("cpu"), 8.0), (_cfg("auto"), 0.0)):
        plan = plan_devices(cfg, gpus)
        assert plan == DevicePlan("cpu", 0.0)
        assert actor_options(0.5, plan) == {"num_cpus": 0.5}  # no num_gpus key at all
        assert with_device(cfg, plan).cluster.device == "cpu"


def test_cuda_actors_carry_num_gpus() -> None:
    plan = plan_devices(_cfg("cuda", workers=4), cluster_gpus=4)
    assert plan == DevicePlan("cuda", 1.0)
    assert actor_options(2.0, plan) == {"num_cpus": 2.0, "num_gpus": 1.0}
    assert with_device(_cfg("auto"), plan).cluster.device == "cuda"
    # auto on a cluster with GPUs (the driver's own machine may have none) trains on them
    assert plan_devices(_cfg("auto", workers=2), cluster_gpus=8) == DevicePlan("cuda", 1.0)


def test_grpc_workers_share_fewer_gpus_evenly() -> None:
    assert plan_devices(_cfg("cuda", workers=4), cluster_gpus=2).gpus_per_actor == 0.5
    # rounded down to Ray's 1e-4 resource step, so three shares still fit one GPU
    share = plan_devices(_cfg("cuda", workers=3), cluster_gpus=1).gpus_per_actor
    assert share == 0.3333 and 3 * share <= 1
    # the in-process runner is one actor holding every worker: one GPU
    assert plan_devices(_cfg("cuda", workers=4, transport="inproc"), cluster_gpus=2) == DevicePlan("cuda", 1.0)


def test_cuda_on_a_cluster_without_gpus_is_one_clear_error() -> None:
    with pytest.raises(ConfigError, match=r"cluster\.device is 'cuda' but the Ray cluster has no GPU"):
        plan_devices(_cfg("cuda"), cluster_gpus=0)


def test_nccl_ranks_need_a_whole_gpu_each() -> None:
    ddp = {"kind": "ddp"}
    with pytest.raises(ConfigError, match=r"NCCL needs a GPU per rank: 4 ranks \(cluster.workers\).* 2 GPUs"):
        plan_devices(_cfg("cuda", workers=4, protocol=ddp), cluster_gpus=2)
    # auto never fails: ranks that cannot each have a GPU train on CPU
    assert plan_devices(_cfg("auto", workers=4, transport="allgather"), cluster_gpus=3) == DevicePlan("cpu", 0.0)
    assert plan_devices(_cfg("auto", workers=3, transport="allgather"), cluster_gpus=3) == DevicePlan("cuda", 1.0)
    # ...unless the recipe insists on NCCL, which cannot run on CPU
    with pytest.raises(ConfigError, match=r"protocol\.backend 'nccl' needs the ranks on CUDA.* 3 GPUs"):
        plan_devices(_cfg("auto", workers=4, protocol={"kind": "ddp", "backend": "nccl"}), cluster_gpus=3)
    with pytest.raises(ConfigError, match=r"protocol\.backend 'nccl' needs the ranks on CUDA"):
        plan_devices(_cfg("cpu", workers=4, protocol={"kind": "ddp", "backend": "nccl"}), cluster_gpus=8)
    assert plan_devices(_cfg("auto", workers=4, protocol=ddp), cluster_gpus=4) == DevicePlan("cuda", 1.0)
    # gloo ranks may share
    gloo = {"kind": "ddp", "backend": "gloo"}
    assert plan_devices(_cfg("cuda", workers=4, protocol=gloo), cluster_gpus=2) == DevicePlan("cuda", 0.5)
