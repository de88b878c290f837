"""The inner optimizer: AdamW, or GaLore's AdamW when `lowrank.method` is `galore`.

GaLore (Zhao et al., "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection", ICML 2024,
arXiv:2403.03507) trains every weight at full rank but keeps Adam's moments in a low-rank projection of
the gradient. For an m x n weight (m >= n) with rank r < n, `galore-torch` projects the gradient on its
smaller side with the top-r right singular vectors (an r x n `ortho_matrix`, refreshed by an SVD of the
gradient every `update_proj_gap` steps), runs Adam on the m x r projection and maps the update back,
scaled by `galore_scale`. The state for that weight is 2mr + rn floats instead of AdamW's 2mn (for m < n,
mirrored: a left m x r projector, r x n moments): it saves optimizer memory only, never weights, gradients
or bytes on the wire. It pays only where r(2 max + min) < 2 max min (`galore_state_elements`), i.e. for
r well below min(m, n); at r >= min(m, n) the projector makes the state larger than AdamW's.

Without `lowrank`, or for the adapter methods (lora / pissa, whose frozen base weights have no gradient),
`build_optimizer` returns exactly the torch AdamW the trainer always used: 2-D weights decayed, the rest
(LayerNorm gains, biases) not, as in GPT-2/nanoGPT. GaLore's AdamW differs from torch's in two details:
its step counter is a Python int, and it applies weight decay after the update rather than before.

A protocol may keep some exchanged tensors frozen on the clients (`ProtocolSettings.frozen_in_training`:
FFA-LoRA's and FedSVD's LoRA A factors): `build_optimizer(..., frozen=...)` leaves the parameters whose names
contain one of those substrings out of every group. They keep `requires_grad` (so they stay among the
exchanged parameters, which the replica and the downlink carry); the trainer drops their gradient.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from protocols.config import LowRankConfig, TrainConfig

# bitsandbytes (imported by galore_torch for its 8-bit AdamW, and by peft when installed; unused here) warns on
# CPU at import time, from bitsandbytes.backends.cpu.ops ("Failed to load CPU gemm_4bit_forward ...").
_BNB_LOGGERS = ("bitsandbytes", "bitsandbytes.cextension", "bitsandbytes.backends.cpu.ops")


def quiet_bitsandbytes() -> None:
    """Keep bitsandbytes' warning about 4-bit CPU kernels, which lowband never uses, out of every run's output
    (call before importing peft or galore_torch)."""
    for name in _BNB_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def matches(module_name: str, patterns: Iterable[str]) -> bool:
    """peft's rule for a list of target modules: the name equals an entry or ends with "." + entry."""
    return any(module_name == p or module_name.endswith("." + p) for p in patterns)


def galore_state_elements(shape: Sequence[int], rank: int) -> int:
    """Elements of galore-torch's AdamW state (proj_type "std") for one m x n weight: two moments of the
    projected gradient and the projector. The SVD is thin, so the effective rank is r = min(rank, m, n);
    the projector spans the smaller side (r x n for m >= n, m x r otherwise) and the moments take the
    larger one (m x r or r x n): r * (2 * max(m, n) + min(m, n)). The step counter is an int, no tensor."""
    m, n = shape
    r = min(rank, m, n)
    return r * (2 * max(m, n) + min(m, n))


def _galore_adamw() -> Callable[..., torch.optim.Optimizer]:
    quiet_bitsandbytes()
    try:
        from galore_torch import GaLoreAdamW
    except ImportError as exc:
        raise ImportError("lowrank.method 'galore' needs galore-torch: pip install 'lowband[hf]'") from exc
    return GaLoreAdamW  # type: ignore[no-any-return]


def frozen_parameters(module: nn.Module, frozen: Iterable[str]) -> list[nn.Parameter]:
    """The trainable parameters of `module` whose name contains one of the `frozen` substrings (the
    protocol's `frozen_in_training`, e.g. FFA-LoRA's and FedSVD's "lora_A"), in `named_parameters()` order."""
    parts = tuple(frozen)
    return [p for name, p in module.named_parameters() if p.requires_grad and any(s in name for s in parts)]


def build_optimizer(
    module: nn.Module, cfg: TrainConfig, lowrank: LowRankConfig | None, lr: float, frozen: Iterable[str] = ()
) -> torch.optim.Optimizer:
    """The inner optimizer over `module`'s trainable parameters (in `module.parameters()` order), less those
    whose name contains a `frozen` substring (`frozen_parameters`: they keep requires_grad, so they stay
    exchanged, and the optimizer never updates them, weight decay included).

    AdamW: groups [2-D weights, decay cfg.weight_decay], [< 2-D, no decay]. GaLore: groups [2-D weights of
    the modules matching `lowrank.target_modules`, projected, decayed], [other 2-D weights, decayed],
    [< 2-D, no decay]. A tied weight is listed once (as `module.parameters()` does)."""
    frozen = tuple(frozen)
    skipped = {id(p) for p in frozen_parameters(module, frozen)}
    params = [p for p in module.parameters() if p.requires_grad and id(p) not in skipped]
    if skipped and not params:
        raise ValueError(f"every trainable parameter matches the frozen names {list(frozen)}: nothing to optimize")
    betas = (cfg.beta1, cfg.beta2)
    if lowrank is None or lowrank.method != "galore":
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        return torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=lr,
            betas=betas,
        )
    target_ids = {
        id(p)
        for name, sub in module.named_modules()
        if matches(name, lowrank.target_modules)
        for p in sub.parameters(recurse=False)
        if p.dim() == 2
    }
    projected = [p for p in params if id(p) in target_ids]
    if not projected:
        raise ValueError(f"lowrank.target_modules {lowrank.target_modules} match no trainable 2-D weight of the model")
    other_2d = [p for p in params if p.dim() >= 2 and id(p) not in target_ids]
    no_decay = [p for p in params if p.dim() < 2]
    galore_group: dict[str, Any] = {
        "params": projected,
        "weight_decay": cfg.weight_decay,
        "rank": lowrank.rank,
        "update_proj_gap": lowrank.update_proj_gap,
        "scale": lowrank.galore_scale,
        "proj_type": "std",
    }
    groups = [
        galore_group,
        {"params": other_2d, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # eps 1e-8 as torch's AdamW (galore-torch defaults to 1e-6); its deprecation warning concerns its
    # transformers ancestry, not GaLore.
    return _galore_adamw()(groups, lr=lr, betas=betas, eps=1e-8, no_deprecation_warning=True)


def state_bytes(value: Any, _seen: set[int] | None = None) -> int:
    """Bytes of every tensor reachable from `value`: through dicts, lists, tuples and plain objects'
    attributes (GaLore's `GaLoreProjector.ortho_matrix`); each tensor counted once."""
    seen = set() if _seen is None else _seen
    if id(value) in seen:
        return 0
    seen.add(id(value))
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(state_bytes(v, seen) for v in value.values())
    if isinstance(value, list | tuple | set):
        return sum(state_bytes(v, seen) for v in value)
    if isinstance(value, nn.Module | torch.optim.Optimizer):
        return 0  # not optimizer state
    if hasattr(value, "__dict__"):
        return sum(state_bytes(v, seen) for v in vars(value).values())
    return 0


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Total bytes of the optimizer's per-parameter state: moments, step tensors, GaLore projectors."""
    seen: set[int] = set()
    return sum(state_bytes(s, seen) for s in optimizer.state.values())
