"""Where a worker trains: `cluster.device` (auto | cpu | cuda) resolved against the GPUs this process sees.

Only the model, its optimizer state and the batches live on the device. Everything a protocol touches
(`Session.params()`, the replica, the codecs, the wire) is on CPU: `InnerTrainer.params` copies the
trainable parameters to CPU and `load_params` copies the replica back onto the device, so the protocols,
their hashes and their byte counts are the same on every device.

The collective baselines (DDP, all-gather) talk over torch.distributed: NCCL when the ranks train on CUDA
(`protocol.backend: auto`), gloo on CPU. NCCL needs a GPU of its own for every rank: under `auto`, ranks
that would have to share one train on CPU instead (`local_ranks_device`; deploy/gpus.py on a Ray cluster).
"""

from __future__ import annotations

import torch

from protocols.config import RunConfig, with_cluster
from protocols.settings import ConfigError

NO_GPU = (
    "cluster.device is 'cuda' but this process sees no CUDA GPU (torch.cuda.is_available() is False: no GPU, "
    "no driver, CUDA_VISIBLE_DEVICES empty, or a CPU-only torch build {torch}); set cluster.device to 'auto' "
    "or 'cpu', or install a CUDA build of torch"
)


def resolve_device(requested: str, index: int = 0) -> torch.device:
    """The torch device for `cluster.device` `requested`: auto -> CUDA when a GPU is visible, else CPU. Worker
    `index` of a machine with several GPUs takes GPU `index % count`, spreading workers over them (a Ray actor
    sees only the GPUs Ray gave it). ConfigError when cuda is requested and no GPU is visible."""
    if requested not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"cluster.device must be 'auto', 'cpu' or 'cuda', got {requested!r}")
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(NO_GPU.format(torch=torch.__version__))
    return torch.device("cuda", index % torch.cuda.device_count())


def resolve_backend(requested: str, device: torch.device) -> str:
    """The torch.distributed backend for `protocol.backend` `requested` on `device`: auto -> nccl when the
    ranks train on CUDA, else gloo. nccl on a CPU device is a ConfigError (NCCL moves only CUDA tensors);
    gloo on CUDA is allowed (slower: gloo stages through host memory, but ranks may then share a GPU)."""
    if requested not in ("auto", "gloo", "nccl"):
        raise ConfigError(f"protocol.backend must be 'auto', 'gloo' or 'nccl', got {requested!r}")
    if requested == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if requested == "nccl" and device.type != "cuda":
        raise ConfigError("protocol.backend 'nccl' needs the ranks on CUDA, but they train on CPU (cluster.device "
                          "is 'cpu', or 'auto' without a visible GPU); use protocol.backend 'gloo' or 'auto'")
    return requested


def local_ranks_device(cfg: RunConfig, requested_backend: str, world_size: int) -> RunConfig:
    """`cfg` for `world_size` ranks spawned on this machine, `cluster.device` pinned to where they can train:
    NCCL ranks cannot share a GPU (they fail inside NCCL with a message that names neither field), so with
    fewer GPUs than ranks `auto` falls back to CPU (gloo) and an explicit `cuda` is a ConfigError."""
    device = resolve_device(cfg.cluster.device)
    if device.type == "cuda" and resolve_backend(requested_backend, device) == "nccl":
        if torch.cuda.device_count() >= world_size:
            return cfg
        if cfg.cluster.device == "cuda":
            raise ConfigError(
                f"NCCL needs a GPU per rank: {world_size} ranks (cluster.workers) but {torch.cuda.device_count()} "
                f"GPUs visible; lower cluster.workers, or set protocol.backend 'gloo' (ranks share GPUs) or "
                f"cluster.device 'cpu'"
            )
        device = torch.device("cpu")
    return with_cluster(cfg, device=device.type)
