"""`lowband sample`: generate text from a finished run's checkpoint (adapters merged, deploy/export.py)."""

from __future__ import annotations

from pathlib import Path

from deploy.export import load_trained_model
from protocols.config import ConfigError
from worker.data import load_corpus
from worker.sample import sample_text


def sample_run(run_dir: Path, prompt: str, tokens: int, temperature: float, top_k: int, seed: int) -> str:
    cfg, model = load_trained_model(run_dir)
    tokenizer = load_corpus(cfg.data.eval_fraction, cfg.data.max_chars).tokenizer
    unknown = sorted(set(prompt) - set(tokenizer.chars))
    if unknown:
        raise ConfigError(f"prompt has characters the model never saw: {unknown}")
    return sample_text(model, tokenizer, prompt, tokens, temperature, top_k, seed)
