"""FFA-LoRA: federated LoRA with the A factors frozen at their initialization.

Sun, Li, Li, Ding, "Improving LoRA in Privacy-preserving Federated Learning", ICLR 2024, arXiv:2403.12313.
Averaging LoRA factors separately (FedAvg-LoRA, protocols/fedavg_lora.py) gives the server
mean(B_k) mean(A_k), not the clients' mean(B_k A_k); under DP-SGD the noise added to both factors also
multiplies (a noise-times-noise term in B A). FFA-LoRA keeps every A at its (random) initialization on every
client and trains only B (zero at the start, so the model starts as its base): with A shared,
mean(B_k) A = mean(B_k A) exactly, the DP noise enters B A linearly, and only B crosses the wire (half of
the adapter bytes for square layers).

Clients: the optimizer skips A (`FFALoRAConfig.frozen_in_training`, wired by worker/session.py); `make_update`
sends B's pseudo-gradient `replica_B - local_B` only, and refuses a local A that changed (the optimizer did
not skip it). Aggregator: `uplink_names` names the B factors (and any other trained tensor), so
`protocols.check.check_update` refuses an update that carries an A or lacks a B; the sample-weighted mean of
B's pseudo-gradients is applied as in FedAvg (`theta - server_lr * mean`); A is never in an aggregate and
never changes. No re-factorization (that is FedSVD, protocols/fedsvd.py).

peft computes `W + (alpha / r) B A`; the paper notes that with A frozen the scaling alpha acts as B's
learning rate, so it may need a larger alpha than LoRA.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar, Literal

import torch

from compression.error_feedback import ErrorFeedback
from protocols.base import Update
from protocols.fedavg_lora import AdapterSettings, FedAvgLoRA
from protocols.replica import Params
from protocols.settings import ProtocolSettings


def is_frozen(name: str, frozen: Iterable[str]) -> bool:
    """Whether tensor `name` contains one of the `frozen` substrings (`ProtocolSettings.frozen_in_training`)."""
    return any(part in name for part in frozen)


class FFALoRAConfig(AdapterSettings):
    """FFA-LoRA (Sun et al., ICLR 2024, arXiv:2403.12313): A frozen on every client, only B trains and is
    sent; sample-weighted mean. Needs `lowrank:` with method lora or pissa."""

    kind: Literal["ffa-lora"] = "ffa-lora"
    frozen_in_training: ClassVar[tuple[str, ...]] = ("lora_A",)


class FFALoRA(FedAvgLoRA):
    """FFA-LoRA (Sun et al., arXiv:2403.12313): clients train and send B only (A frozen at its
    initialization); the weighted mean of B's pseudo-gradients steps every replica's B."""

    settings: ClassVar[type[ProtocolSettings]] = FFALoRAConfig

    @property
    def frozen(self) -> tuple[str, ...]:
        """Name substrings of the tensors clients keep frozen and never send."""
        return type(self).settings.frozen_in_training

    def uplink_names(self, names: frozenset[str]) -> frozenset[str]:
        return frozenset(n for n in names if not is_frozen(n, self.frozen))

    def make_update(self, local: Params, replica: Params, state: ErrorFeedback | None
                    ) -> tuple[Update, ErrorFeedback | None]:
        """B's pseudo-gradient (every tensor that trains); ValueError naming a frozen tensor that changed."""
        sent: Params = {}
        for name, tensor in local.items():
            if not is_frozen(name, self.frozen):
                sent[name] = tensor
            elif name in replica and not torch.equal(tensor.detach(), replica[name].to(tensor.device)):
                raise ValueError(
                    f"{self.kind}: tensor {name!r} is frozen on the clients but changed in local training: the "
                    f"inner optimizer must skip {list(self.frozen)} (ProtocolSettings.frozen_in_training)"
                )
        if not sent:
            raise ValueError(f"{self.kind}: no trained tensor to send (every local tensor matches {list(self.frozen)})")
        return super().make_update(sent, replica, state)
