"""How `lowband run` places a run's actors on the Ray cluster's GPUs (`cluster.device`).

The driver decides from the cluster's resources, not from its own machine: on an existing cluster
(`--address`) the head node may have no GPU while the worker nodes do. `auto` means CUDA when the
cluster has any GPU. The decision is written into the config the actors get (`cluster.device` becomes
'cpu' or 'cuda'), so every actor trains where Ray placed it, and config.yaml records it.

- grpc workers share the GPUs evenly, at most one each (`num_gpus = min(1, GPUs / workers)`; Ray accepts
  fractions and sets each actor's CUDA_VISIBLE_DEVICES).
- DDP and all-gather ranks over NCCL need a whole GPU each: with fewer GPUs than ranks, `auto` trains them
  on CPU and `cuda` is a ConfigError (DDP with `protocol.backend: gloo` may share GPUs, like grpc workers).
- the in-process runner (one actor holding every worker as a thread) takes one GPU.
- the coordinator does CPU work only and asks for no GPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from protocols.config import RunConfig, with_cluster
from protocols.ddp import DDPConfig
from protocols.settings import ConfigError


@dataclass(frozen=True)
class DevicePlan:
    """Where a run's training actors go: their device and the GPUs each asks Ray for."""

    device: Literal["cpu", "cuda"]
    gpus_per_actor: float


def _actors(cfg: RunConfig) -> int:
    """How many actors train: one for the in-process runner, one per worker otherwise."""
    if cfg.protocol.kind != "ddp" and cfg.cluster.transport == "inproc":
        return 1
    return cfg.cluster.workers


def _needs_whole_gpus(cfg: RunConfig) -> bool:
    """NCCL ranks: DDP unless its backend is gloo, and all-gather (whose backend follows the device)."""
    if isinstance(cfg.protocol, DDPConfig):
        return cfg.protocol.backend != "gloo"
    return cfg.cluster.transport == "allgather"


def plan_devices(cfg: RunConfig, cluster_gpus: float) -> DevicePlan:
    """The plan for `cfg` on a Ray cluster with `cluster_gpus` GPUs in all (`ray.cluster_resources()`); a
    ConfigError naming the field when `cluster.device` cannot be met."""
    requested = cfg.cluster.device
    plan = _plan(cfg, cluster_gpus)
    if plan.device == "cpu" and isinstance(cfg.protocol, DDPConfig) and cfg.protocol.backend == "nccl":
        raise ConfigError(f"protocol.backend 'nccl' needs the ranks on CUDA, but cluster.device {requested!r} on a "
                          f"Ray cluster with {cluster_gpus:g} GPUs trains them on CPU; use protocol.backend 'gloo' "
                          f"or 'auto'")
    return plan


def _plan(cfg: RunConfig, cluster_gpus: float) -> DevicePlan:
    requested = cfg.cluster.device
    if requested == "cpu" or (requested == "auto" and cluster_gpus <= 0):
        return DevicePlan("cpu", 0.0)
    if cluster_gpus <= 0:
        raise ConfigError("cluster.device is 'cuda' but the Ray cluster has no GPU (ray.cluster_resources() lists "
                          "none; `ray status` shows what it has); set cluster.device to 'auto' or 'cpu'")
    actors = _actors(cfg)
    if _needs_whole_gpus(cfg):
        if cluster_gpus >= actors:
            return DevicePlan("cuda", 1.0)
        if requested == "auto":  # auto never fails: ranks that cannot have a GPU each train on CPU
            return DevicePlan("cpu", 0.0)
        raise ConfigError(
            f"NCCL needs a GPU per rank: {actors} ranks (cluster.workers) but the Ray cluster has {cluster_gpus:g} "
            f"GPUs; lower cluster.workers, set cluster.device 'cpu', or (ddp) protocol.backend 'gloo' so that ranks "
            f"share GPUs")
    # Ray takes resource amounts in steps of 1e-4: round the share down so that every actor still fits.
    return DevicePlan("cuda", min(1.0, math.floor(cluster_gpus / actors * 1e4) / 1e4))


def with_device(cfg: RunConfig, plan: DevicePlan) -> RunConfig:
    """`cfg` with `cluster.device` set to the plan's: what every actor of the run is given."""
    return with_cluster(cfg, device=plan.device)


def actor_options(num_cpus: float, plan: DevicePlan) -> dict[str, Any]:
    """Ray `.options(...)` of one training actor: its CPUs, and its GPUs when the plan trains on CUDA."""
    options: dict[str, Any] = {"num_cpus": num_cpus}
    if plan.gpus_per_actor > 0:
        options["num_gpus"] = plan.gpus_per_actor
    return options
