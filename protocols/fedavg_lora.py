"""FedAvg over LoRA factors: the baseline the federated-LoRA papers improve on.

FedAvg (McMahan et al., AISTATS 2017, arXiv:1602.05629) applied to a model whose clients train only LoRA
adapters (Hu et al., arXiv:2106.09685; `lowrank:` with method lora or pissa, worker/lowrank.py). The
exchanged tensors are then the factors A (r, in) and B (out, r) of every adapted layer, and FedAvg over the
exchanged tensors averages A and B separately: the server's adapter is mean(B_k) mean(A_k), which is not
the mean of the clients' adapters mean(B_k A_k) (the cross terms do not cancel). This aggregation bias is
what FFA-LoRA (protocols/ffa_lora.py: A frozen, so mean(B_k) A = mean(B_k A)) and FedSVD (protocols/fedsvd.py)
remove; see Sun et al., arXiv:2403.12313, section 3, and Lee et al., arXiv:2505.12805.

The protocol is FedAvg itself; what this kind adds is the config check that adapters are configured.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

from protocols.fedavg import FedAvg, FederatedSettings
from protocols.settings import ConfigError, ProtocolSettings

if TYPE_CHECKING:
    from protocols.config import RunConfig

ADAPTER_METHODS = ("lora", "pissa")


def require_adapters(kind: str, cfg: RunConfig) -> None:
    """ConfigError naming `lowrank` unless the run trains LoRA / PiSSA adapters."""
    method = cfg.lowrank.method if cfg.lowrank is not None else None
    if method not in ADAPTER_METHODS:
        given = "no lowrank: block" if method is None else f"lowrank.method {method!r}"
        raise ConfigError(
            f"protocol.kind {kind!r} exchanges LoRA factors and needs a lowrank: block with method 'lora' or "
            f"'pissa' (got {given}); for every weight use protocol.kind 'fedavg'"
        )


class AdapterSettings(FederatedSettings):
    """A federated section whose clients exchange LoRA factors: the run must configure adapters (no `kind` of
    its own: it registers nothing)."""

    def check_run(self, cfg: RunConfig) -> None:
        require_adapters(self.kind, cfg)


class FedAvgLoRAConfig(AdapterSettings):
    """FedAvg over LoRA factors (McMahan et al., arXiv:1602.05629, on Hu et al.'s adapters): A and B averaged
    separately, weighted by sample counts. Needs `lowrank:` with method lora or pissa."""

    kind: Literal["fedavg-lora"] = "fedavg-lora"


class FedAvgLoRA(FedAvg):
    """FedAvg over the exchanged LoRA factors (McMahan et al., arXiv:1602.05629): the weighted mean of A and
    of B, each on its own (biased for the product B A; see the module docstring)."""

    settings: ClassVar[type[ProtocolSettings]] = FedAvgLoRAConfig
