"""Low-rank local training: LoRA and PiSSA adapters through `peft`, and what the wire needs to know of them.

- LoRA (Hu et al., arXiv:2106.09685): a target linear layer computes `W x + (alpha / r) B A x` with `W`
  frozen, `A` (r, in) random and `B` (out, r) zero, so the adapted model starts as its base.
- PiSSA (Meng et al., arXiv:2404.02948): `A` and `B` start from the top-r singular triplets of `W` and the
  frozen weight becomes the residual, `W_res = W - (alpha / r) B A`, so again the model starts unchanged but
  the adapter trains the principal directions. peft's `init_lora_weights="pissa"` (exact SVD) does both.
- GaLore (`method: galore`) trains every weight and changes only the optimizer (worker/optimizers.py):
  this module leaves such a model as it is.

With adapters, the trainable tensors are the factors only: `trainable_params` is what the round loop hands
to the protocol (pseudo-gradients, codecs and error feedback apply to factors like any tensor), and the
frozen base never crosses the wire. Every worker builds its base itself from the same seed or `init_from`
checkpoint; `base_digest` is what it attests at join so a worker whose base differs is refused.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from protocols.config import LowRankConfig
from protocols.replica import Params
from worker.optimizers import quiet_bitsandbytes
from worker.trainer import params_digest

ADAPTER_METHODS = ("lora", "pissa")


def apply_lowrank(model: nn.Module, cfg: LowRankConfig | None) -> nn.Module:
    """`model` with LoRA / PiSSA adapters injected by peft (base weights frozen), or `model` itself for no
    `lowrank:` block and for GaLore. peft checks `target_modules`; a pattern that matches no layer is an
    error naming the patterns, not a silently dense run."""
    if cfg is None or cfg.method not in ADAPTER_METHODS:
        return model
    quiet_bitsandbytes()
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as err:
        raise ImportError(f"lowrank.method {cfg.method!r} needs peft ({err}): pip install 'lowband[hf]'") from None

    config = LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        init_lora_weights="pissa" if cfg.method == "pissa" else True,
        bias="none",
    )
    try:
        adapted: nn.Module = get_peft_model(model, config)
    except ValueError as err:
        linears = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(f"lowrank.target_modules {cfg.target_modules} matched no layer ({err}); this model's "
                         f"linear layers end in: {linears}") from None
    return adapted


def merge_lowrank(model: nn.Module) -> nn.Module:
    """The plain model with every adapter folded into its base weight (`W + (alpha / r) B A`), for export and
    sampling; a model without adapters is returned as it is."""
    merge: Any = getattr(model, "merge_and_unload", None)
    if merge is None:
        return model
    merged: nn.Module = merge()
    return merged


def frozen_params(model: nn.Module) -> Params:
    """The parameters that never train (a peft model's base), detached: what `base_digest` hashes."""
    return {name: p.detach() for name, p in model.named_parameters() if not p.requires_grad}


def base_digest(model: nn.Module) -> str:
    """Digest of the frozen base weights; "" when every weight trains (nothing frozen to agree on)."""
    frozen = frozen_params(model)
    return params_digest(frozen) if frozen else ""

