"""FedSVD: FFA-LoRA's frozen A, re-factorized by an SVD of the aggregate every round.

Lee et al., "FedSVD: Adaptive Orthogonalization for Private Federated Learning with LoRA", NeurIPS 2025,
arXiv:2505.12805. Clients freeze A and train only B (with DP-SGD in the paper; worker/federated), sending
B's pseudo-gradient, as in FFA-LoRA (protocols/ffa_lora.py). The server aggregates B (weighted by sample
counts: B_agg = B - server_lr * mean of the pseudo-gradients), forms `M = B_agg A` per adapted layer, takes
its SVD `M = U S V^T` and sends back `A = V_r^T` (orthonormal rows) and `B = U_r S_r`, so `B A = M` exactly
(rank M <= r). peft computes `W + (alpha / r) B A`: re-factorizing the product keeps `(alpha / r) B A` too.

What the orthonormal A buys: since A A^T = I_r, the DP-SGD noise xi added to B reaches the model as xi A with
||xi A||_F = ||xi||_F (not amplified by A), and B's gradient G A^T is no larger than the layer's G, so
per-example clipping does not fight A's scale. Unlike FFA-LoRA's A fixed at a random draw, A follows the
principal directions of the aggregate each round; as in FFA-LoRA all clients share A, so the mean of B is
the mean of the clients' B A (no FedAvg-LoRA bias).

Design. `Protocol.close(acc, state)` does not see the replica, so the aggregator state mirrors every A and
B (`FedSVDState.factors`, copied from the replica by `init_aggregator_state`). `close` computes the new
factors and returns `u = old - new` for every A and B as the aggregate update, so every replica applies the
plain `theta - u` (AveragingProtocol's outer SGD with lr 1, no momentum): deterministic, no SVD on workers.
The mirror advances with exactly that float op (`nesterov_sgd`), so it equals the replica bit for bit; a
lossy downlink would break that, so `FedSVDConfig` refuses any downlink but dense.

`refactorize` works in float64 on the CPU through thin QR factorizations of B and A^T and the SVD of their
r x r core (cost O((out + in) r^2), not an SVD of the out x in product): when rank M < r the trailing
directions of A are completed inside the old A's row space instead of arbitrarily, and singular vectors get
a canonical sign, so the result is a deterministic function of (B, A) on a given machine.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from pydantic import model_validator

from protocols.base import Accumulator
from protocols.compressed import NO_COMPRESSION, Compression, WorkerShifts
from protocols.fedavg_lora import AdapterSettings
from protocols.ffa_lora import FFALoRA
from protocols.outer import nesterov_sgd
from protocols.replica import Params, Replica
from protocols.settings import ProtocolSettings

__all__ = ["FedSVD", "FedSVDConfig", "FedSVDState", "lora_pairs", "refactorize"]

# peft's factor names: `<prefix>.lora_A.<adapter>.weight` / `<prefix>.lora_B.<adapter>.weight`.
_FACTOR = re.compile(r"^(?P<prefix>.+)\.lora_(?P<which>[AB])\.(?P<rest>.+)$")


def lora_pairs(names: Iterable[str]) -> list[tuple[str, str]]:
    """Every (A name, B name) pair of LoRA factors among `names`, sorted; names that are no factor are
    ignored. ValueError naming a factor whose partner is missing."""
    found: dict[tuple[str, str], dict[str, str]] = {}
    for name in names:
        match = _FACTOR.match(name)
        if match:
            found.setdefault((match["prefix"], match["rest"]), {})[match["which"]] = name
    pairs = []
    for (prefix, rest), sides in sorted(found.items()):
        for have, lack in (("A", "B"), ("B", "A")):
            if have in sides and lack not in sides:
                raise ValueError(f"LoRA factor {sides[have]!r} has no partner {f'{prefix}.lora_{lack}.{rest}'!r}")
        pairs.append((sides["A"], sides["B"]))
    return pairs


def refactorize(b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B', A') with B' A' = B A, A' = V_r^T (orthonormal rows) and B' = U_r S_r, from the SVD of B A.

    b: (out, r), a: (r, in) -> b_new: (out, r), a_new: (r, in), in the input dtypes and devices.
    k = min(out, in, r) rows of A' are orthonormal right singular vectors of B A (A' A'^T = I_r when
    r <= min(out, in)); when r exceeds min(out, in) the remaining rows of A' and columns of B' are zero.
    """
    if b.dim() != 2 or a.dim() != 2 or b.shape[1] != a.shape[0]:
        raise ValueError(f"refactorize needs b (out, r) and a (r, in), got {tuple(b.shape)} and {tuple(a.shape)}")
    out, r = b.shape
    n_in = a.shape[1]
    b64 = b.detach().to("cpu", torch.float64)  # (out, r)
    a64 = a.detach().to("cpu", torch.float64)  # (r, in)
    q_b, r_b = torch.linalg.qr(b64)  # q_b: (out, p), r_b: (p, r), p = min(out, r)
    q_a, r_a = torch.linalg.qr(a64.T)  # q_a: (in, q), r_a: (q, r), q = min(in, r)
    core = r_b @ r_a.T  # (p, q): B A = q_b core q_a^T
    u_c, s, vh_c = torch.linalg.svd(core, full_matrices=False)  # (p, k), (k,), (k, q), k = min(p, q)
    u = q_b @ u_c  # (out, k), orthonormal columns
    vh = vh_c @ q_a.T  # (k, in), orthonormal rows
    # Canonical signs: each right singular vector's largest-magnitude entry is positive.
    signs = torch.sign(vh.gather(1, vh.abs().argmax(dim=1, keepdim=True)))  # (k, 1)
    signs[signs == 0] = 1.0
    vh, u = vh * signs, u * signs.T
    k = s.numel()
    a_new = torch.zeros(r, n_in, dtype=torch.float64)
    b_new = torch.zeros(out, r, dtype=torch.float64)
    a_new[:k] = vh
    b_new[:, :k] = u * s  # U_r S_r
    return b_new.to(b.device, b.dtype), a_new.to(a.device, a.dtype)


class FedSVDConfig(AdapterSettings):
    """FedSVD (Lee et al., NeurIPS 2025, arXiv:2505.12805): A frozen on the clients, B aggregated, B A
    re-factorized by SVD every round. Needs `lowrank:` with method lora or pissa and a dense downlink."""

    kind: Literal["fedsvd"] = "fedsvd"
    frozen_in_training: ClassVar[tuple[str, ...]] = ("lora_A",)

    @model_validator(mode="after")
    def _dense_downlink(self) -> FedSVDConfig:
        if self.downlink.codec not in ("auto", "none"):
            raise ValueError(
                f"protocol.downlink.codec {self.downlink.codec!r} is not allowed for fedsvd: its aggregator keeps "
                "a mirror of every LoRA factor that must equal each replica bit for bit, so the downlink must be "
                "dense ('none' or 'auto')"
            )
        return self


@dataclass(frozen=True)
class FedSVDState:
    """factors: the aggregator's mirror of every replica's A and B (bit for bit). shifts: the per-worker
    shifts of an ef21 / econtrol uplink (`protocols.compressed.WorkerShifts`), else None."""

    factors: Params
    shifts: WorkerShifts | None = None


class FedSVD(FFALoRA):
    """FedSVD (Lee et al., arXiv:2505.12805): clients send B's pseudo-gradient (A frozen); the aggregator
    averages B and re-factorizes B A by SVD into an orthonormal A and B = U S; replicas apply `theta - u`."""

    settings: ClassVar[type[ProtocolSettings]] = FedSVDConfig

    def __init__(self, server_lr: float = 1.0, compression: Compression = NO_COMPRESSION) -> None:
        if server_lr <= 0.0:
            raise ValueError(f"FedSVD server_lr must be > 0, got {server_lr}")
        super().__init__(server_lr=1.0, compression=compression)  # replicas apply u as it is: lr 1
        self.server_lr = server_lr  # scales the mean of B's pseudo-gradients, in `close`

    def init_aggregator_state(self, replica: Replica) -> FedSVDState:  # type: ignore[override]
        """The mirror of the replica's factors; ValueError when it has none or an unpaired one."""
        pairs = lora_pairs(replica.params)
        if not pairs:
            raise ValueError("fedsvd found no LoRA factor pairs (*.lora_A.* / *.lora_B.*) among the exchanged "
                             "tensors: it needs lowrank: with method lora or pissa")
        factors = {name: replica.params[name].detach().clone() for pair in pairs for name in pair}
        return FedSVDState(factors, super().init_aggregator_state(replica))

    def close(self, acc: Accumulator, state: Any) -> tuple[Params, FedSVDState]:  # type: ignore[override]
        """u = old - new for every factor (new: B and A re-factorized from the aggregated B and the mirror's
        A), `server_lr * mean` for any other trained tensor; the mirror advanced by `theta - u`."""
        if not isinstance(state, FedSVDState):
            raise TypeError(f"FedSVD's aggregator state is a FedSVDState, got {type(state).__name__}")
        mean, shifts = super().close(acc, state.shifts)
        update = {name: self.server_lr * m for name, m in mean.items()}
        for a_name, b_name in lora_pairs(state.factors):
            if b_name not in update:
                raise ValueError(f"fedsvd: the round's aggregate lacks {b_name!r}")
            a_old, b_old = state.factors[a_name], state.factors[b_name]
            work = torch.promote_types(b_old.dtype, torch.float32)
            b_agg = b_old.to(work) - update[b_name].to(b_old.device, work)  # (out, r)
            b_new, a_new = refactorize(b_agg, a_old.to(work))
            update[b_name] = b_old.to(work) - b_new
            update[a_name] = a_old.to(work) - a_new
        # Exactly the step every replica takes (AveragingProtocol.apply: lr 1, no momentum).
        factors, _ = nesterov_sgd(state.factors, {n: update[n] for n in state.factors}, {}, lr=1.0, momentum=0.0)
        return update, FedSVDState(factors, shifts)

    @property
    def relayable(self) -> bool:
        return False  # close needs the mirror: a replica cannot refold relayed updates
