"""`lowband sample`: generate text from a finished run's checkpoint."""

from __future__ import annotations

from pathlib import Path

from coordinator.rundir import load_checkpoint
from protocols.config import ConfigError, load_config
from worker.data import load_corpus
from worker.model import GPT
from worker.sample import sample_text


def sample_run(run_dir: Path, prompt: str, tokens: int, temperature: float, top_k: int, seed: int) -> str:
    config, ckpt_path = run_dir / "config.yaml", run_dir / "checkpoint.pt"
    for path in (config, ckpt_path):
        if not path.is_file():
            raise ConfigError(f"{path} does not exist: is {run_dir} a finished lowband run directory?")
    cfg = load_config(config)
    tokenizer = load_corpus(cfg.data.eval_fraction, cfg.data.max_chars).tokenizer
    unknown = sorted(set(prompt) - set(tokenizer.chars))
    if unknown:
        raise ConfigError(f"prompt has characters the model never saw: {unknown}")
    model = GPT(cfg.model, tokenizer.vocab_size)
    model.load_state_dict(load_checkpoint(ckpt_path)["params"], strict=False)
    return sample_text(model, tokenizer, prompt, tokens, temperature, top_k, seed)
