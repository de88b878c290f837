"""The model registry: what a run trains, built the same way on every worker, by `lowband export` and by
`lowband sample`.

`build_model` = the architecture (`model.kind`: the GPT of worker/model.py, or a local Hugging Face causal
LM, worker/hf_model.py) -> the initial weights (`init_from`: a lowband checkpoint; else the seed's random
initialization, or the HF directory's own weights) -> the low-rank parameterization (`lowrank:`,
worker/lowrank.py). Initialization draws from torch's global RNG, so the caller seeds it first.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from protocols.config import ConfigError, RunConfig
from protocols.replica import Params
from worker.lowrank import apply_lowrank
from worker.model import GPT


def build_architecture(cfg: RunConfig, vocab_size: int) -> nn.Module:
    """The bare model of `cfg.model`, randomly initialized (or, for an HF directory with weights, those)."""
    if cfg.model.kind == "hf":
        from worker.hf_model import build_hf_model

        return build_hf_model(cfg.model, vocab_size)
    return GPT(cfg.model, vocab_size)


def checkpoint_path(source: str | Path) -> Path:
    """The checkpoint file `init_from` names: a file as it is, a run directory's `checkpoint.pt`."""
    path = Path(source)
    if path.is_dir():
        path = path / "checkpoint.pt"
    if not path.is_file():
        raise ConfigError(f"init_from {str(source)!r}: {path} does not exist (give a lowband run directory or a "
                          "checkpoint file)")
    return path


def read_checkpoint_params(source: str | Path) -> Params:
    """The `params` of a lowband checkpoint (our own file, so full unpickling is fine)."""
    path = checkpoint_path(source)
    ckpt: Any = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("params"), dict):
        raise ConfigError(f"init_from {str(source)!r}: {path} is not a lowband checkpoint (no 'params')")
    params: Params = ckpt["params"]
    return params


@torch.no_grad()
def load_weights(model: nn.Module, params: Params, source: str | Path) -> None:
    """Copy a checkpoint's parameters into the bare model: every parameter, by name and shape, or an error
    naming what differs (nothing is copied then)."""
    own = dict(model.named_parameters())
    if any(".lora_" in name for name in params):
        raise ConfigError(f"init_from {str(source)!r} holds adapter factors only (a run trained with lowrank "
                          f"adapters): merge them first with `lowband export {source}` and start from its export")
    missing, unexpected = sorted(own.keys() - params.keys()), sorted(params.keys() - own.keys())
    if missing or unexpected:
        raise ConfigError(f"init_from {str(source)!r} does not fit model: missing {missing[:5]}, "
                          f"unexpected {unexpected[:5]} (is model: the same as the run it came from?)")
    wrong = [f"{n} {tuple(params[n].shape)} != {tuple(p.shape)}" for n, p in own.items() if params[n].shape != p.shape]
    if wrong:
        raise ConfigError(f"init_from {str(source)!r} does not fit model: shapes differ: {wrong[:5]}")
    for name, p in own.items():
        p.copy_(params[name])


def build_model(cfg: RunConfig, vocab_size: int) -> nn.Module:
    """The model a worker of `cfg` trains; see the module docstring."""
    model = build_architecture(cfg, vocab_size)
    if cfg.init_from is not None:
        load_weights(model, read_checkpoint_params(cfg.init_from), cfg.init_from)
    return apply_lowrank(model, cfg.lowrank)
