"""`lowband export RUN`: a finished run as a plain checkpoint, adapters merged; and the trained model that
`lowband sample` reads.

A run trained with adapters checkpoints their factors only (the frozen base never moved). To rebuild the
adapted model, the base is built again exactly as every worker built it (the run's seed, model and
`init_from`) and checked against the base digest the workers attested; the factors are loaded and merged
into the base weights (`W + (alpha / r) B A`, peft's `merge_and_unload`). The export directory holds that
plain checkpoint next to the run's config without `lowrank` and `init_from`, so it is itself a run
directory: `lowband sample RUN/export` and `init_from: RUN/export` read it like any other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from coordinator.rundir import load_checkpoint
from protocols.config import ConfigError, RunConfig, load_config, to_yaml
from worker.data import load_corpus
from worker.lowrank import ADAPTER_METHODS, base_digest, merge_lowrank
from worker.models import build_architecture, build_model, load_weights
from worker.trainer import load_trainable

EXPORT_DIR = "export"


def _adapted(cfg: RunConfig) -> bool:
    return cfg.lowrank is not None and cfg.lowrank.method in ADAPTER_METHODS


def load_trained_model(run_dir: Path) -> tuple[RunConfig, nn.Module]:
    """The run's config and its final model, adapters merged (see the module docstring)."""
    cfg, model, _ = _trained(run_dir)
    return cfg, model


def _trained(run_dir: Path) -> tuple[RunConfig, nn.Module, dict[str, Any]]:
    """`load_trained_model`, and the checkpoint it read (read once: export keeps its round and run id)."""
    config, ckpt_path = run_dir / "config.yaml", run_dir / "checkpoint.pt"
    for path in (config, ckpt_path):
        if not path.is_file():
            raise ConfigError(f"{path} does not exist: is {run_dir} a finished lowband run directory?")
    cfg = load_config(config)
    ckpt = load_checkpoint(ckpt_path)
    vocab = load_corpus(cfg.data.eval_fraction, cfg.data.max_chars).tokenizer.vocab_size
    torch.manual_seed(cfg.seed)  # the base every worker built (adapters: their initial factors are overwritten)
    if not _adapted(cfg):
        model = build_architecture(cfg, vocab)
        load_weights(model, ckpt["params"], ckpt_path)
        return cfg, model, ckpt
    model = build_model(cfg, vocab)
    attested = str(ckpt.get("base_digest", ""))
    if attested and base_digest(model) != attested:
        raise ConfigError(f"{run_dir}: the base rebuilt from the run's config (init_from {cfg.init_from!r}) is not "
                          "the one its workers trained against (base digest differs); was init_from changed?")
    try:
        load_trainable(model, ckpt["params"])
    except ValueError as err:
        raise ConfigError(f"{ckpt_path}: its tensors are not this run's adapter factors ({err})") from None
    return cfg, merge_lowrank(model), ckpt


def export_run(run_dir: Path, out: Path | None = None) -> Path:
    """Write the merged model of `run_dir` as a plain run directory (default `run_dir/export`); its path."""
    cfg, model, ckpt = _trained(run_dir)
    out = out if out is not None else run_dir / EXPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    plain = cfg.model_copy(update={"lowrank": None, "init_from": None})
    (out / "config.yaml").write_text(to_yaml(plain))
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    torch.save({"round": ckpt["round"], "run_id": ckpt.get("run_id", ""), "params": params,
                "exported_from": str(run_dir)}, out / "checkpoint.pt")
    return out
