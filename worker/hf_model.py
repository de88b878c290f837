"""A Hugging Face `transformers` causal LM behind the interface of worker/model.py's `GPT`.

The trainer, evaluation and `lowband sample` only call `model(idx, targets) -> (logits, loss)` and
`model.generate(...)` and read `vocab_size` and `cfg.block_size`; `HFCausalLM` adapts any
`AutoModelForCausalLM` to exactly that, so `model.kind: hf` trains under every protocol unchanged.

The loss is computed here, not by passing `labels=` to the HF model: lowband's data loader already hands
over the next tokens as `targets` (y is x shifted by one), and HF models shift `labels` by one themselves,
so passing them would train each position to predict the token two ahead.

The model is read from a local directory only (`local_files_only=True`, never a hub download): with its
weights when the directory has them, otherwise freshly initialised from its `config.json`. That
initialisation draws from torch's global RNG, so `torch.manual_seed(s)` before `build_hf_model` gives
bit-identical weights on every worker, as with `GPT`. `transformers` is imported inside the builder only,
so importing this module costs nothing without the `lowband[hf]` extra.

The logits are cut to the corpus tokenizer's vocabulary (`vocab_size`, at most the HF model's): the rows of a
larger HF vocabulary are ids the character tokenizer never produces, so neither the loss nor sampling
spreads probability over them.

Shape letters: B batch, T time (sequence), V vocab (the tokenizer's).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from protocols.config import ConfigError, ModelConfig
from worker.model import generate_tokens

# Any of these in the directory means it holds weights to load (single file or sharded).
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


class HFCausalLM(nn.Module):
    """`hf_model` (a transformers causal LM) with GPT's forward/generate; `cfg` is lowband's ModelConfig and
    `vocab_size` the tokenizer's (the logits are cut to it, see the module docstring)."""

    def __init__(self, hf_model: nn.Module, cfg: ModelConfig, vocab_size: int) -> None:
        super().__init__()
        self.hf: Any = hf_model  # a transformers PreTrainedModel (save_pretrained, .config, ...)
        self.cfg = cfg
        self.block_size = cfg.block_size
        self.vocab_size = vocab_size
        self.train()  # like a fresh GPT (from_pretrained hands the model back in eval mode)

    def num_params(self) -> int:
        """Number of distinct parameters (tied weights counted once)."""
        return sum(p.numel() for p in self.parameters())

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, T, V) for token ids `idx` (B, T); mean cross-entropy against `targets` (B, T) if given.

        `targets` are already the next tokens: they are compared position by position, not shifted.
        """
        if idx.dim() != 2:
            raise ValueError(f"idx must be (batch, time), got shape {tuple(idx.shape)}")
        B, T = idx.shape
        if T > self.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.block_size}")
        logits = self.hf(input_ids=idx, use_cache=False).logits[..., : self.vocab_size]  # (B, T, V)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.reshape(B * T, -1).float(), targets.reshape(B * T))
        return logits, loss

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Extend `idx` (B, T) by `max_new_tokens` tokens -> (B, T + max_new_tokens), as `GPT.generate`.

        Context cropped to the last `block_size` tokens; temperature 0 is greedy; top_k keeps the k likeliest.
        """
        return generate_tokens(self, self.block_size, idx, max_new_tokens, temperature, top_k, generator)


def _max_positions(config: Any) -> int | None:
    """The longest sequence the HF config allows, if it says (GPT-2 `n_positions`, most others the latter)."""
    for name in ("n_positions", "max_position_embeddings"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


def build_hf_model(model_cfg: ModelConfig, vocab_size: int) -> HFCausalLM:
    """The causal LM in the local directory `model_cfg.path`, checked to fit a `vocab_size`-token corpus.

    Loads the directory's weights when it has them, else initialises from its config.json (global torch RNG).
    Raises ConfigError naming the problem: no such directory, no config.json, the model's vocabulary smaller
    than `vocab_size`, `block_size` longer than the model's positions, or `transformers` not installed.
    """
    if not model_cfg.path:
        raise ConfigError("model.kind 'hf' needs model.path: a local directory holding the model's config.json")
    path = Path(model_cfg.path).expanduser()
    if not path.exists():
        raise ConfigError(f"model.path {str(path)!r} does not exist")
    if not path.is_dir():
        raise ConfigError(f"model.path {str(path)!r} is not a directory")
    if not (path / "config.json").is_file():
        raise ConfigError(f"model.path {str(path)!r} has no config.json")
    try:
        from transformers import AutoConfig, AutoModelForCausalLM
        from transformers.utils import logging as hf_logging
    except ImportError as err:
        raise ConfigError(
            f"model.kind 'hf' needs transformers ({err}); install the extra: pip install 'lowband[hf]'"
        ) from None

    hf_logging.disable_progress_bar()  # a worker's output is one line per round, not a loading bar
    hf_logging.set_verbosity_error()
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    hf_vocab = getattr(text_config, "vocab_size", None)
    if not isinstance(hf_vocab, int):
        raise ConfigError(f"model.path {str(path)!r}: config.json gives no vocab_size")
    if hf_vocab < vocab_size:
        raise ConfigError(
            f"model.path {str(path)!r}: the model's vocab_size {hf_vocab} is smaller than the tokenizer's "
            f"vocab_size {vocab_size}; its token ids would not fit"
        )
    max_pos = _max_positions(text_config)
    if max_pos is not None and model_cfg.block_size > max_pos:
        raise ConfigError(
            f"model.block_size {model_cfg.block_size} is larger than the model's max positions {max_pos} "
            f"(model.path {str(path)!r})"
        )

    has_weights = any((path / name).is_file() for name in WEIGHT_FILES)
    for attn in ("sdpa", "eager"):  # torch's fused attention where the architecture supports it; both run on CPU
        try:
            hf_model = (
                AutoModelForCausalLM.from_pretrained(path, local_files_only=True, attn_implementation=attn)
                if has_weights
                else AutoModelForCausalLM.from_config(config, attn_implementation=attn)
            )
            break
        except ValueError:  # "does not support ... scaled_dot_product_attention": fall back to eager
            if attn == "eager":
                raise
    return HFCausalLM(hf_model.float(), model_cfg, vocab_size)  # fp32 params whatever the checkpoint's dtype
