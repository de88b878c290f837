"""Text from a trained model (the GPT, or an HF causal LM through worker/hf_model.py): the prompt followed
by sampled characters."""

from __future__ import annotations

from typing import Any

import torch

from worker.data import CharTokenizer


def sample_text(
    model: Any,  # an nn.Module with `vocab_size` and GPT's `generate` (worker/model.py, worker/hf_model.py)
    tokenizer: CharTokenizer,
    prompt: str,
    max_new_tokens: int,
    temperature: float = 0.8,
    top_k: int | None = None,
    seed: int = 0,
) -> str:
    """`prompt` plus `max_new_tokens` sampled characters; the same seed gives the same text.

    An empty prompt starts from a newline (the start of a line of script). The model is put in eval
    mode for sampling and returned to the mode it was in.
    """
    if model.vocab_size != tokenizer.vocab_size:
        raise ValueError(f"model vocab ({model.vocab_size}) != tokenizer vocab ({tokenizer.vocab_size})")
    start = prompt or "\n"
    device = next(model.parameters()).device
    idx = tokenizer.encode(start).to(device)[None, :]  # (1, T)
    generator = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        out = model.generate(idx, max_new_tokens, temperature, top_k, generator)  # (1, T + new)
    finally:
        model.train(was_training)
    return prompt + tokenizer.decode(out[0, idx.size(1) :])
