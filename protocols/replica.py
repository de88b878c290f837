"""The replica every worker and the coordinator hold: global parameters, outer optimizer state and the
downlink's receiver state, after a given number of rounds.

Each round every replica applies the same aggregate with the same pure code, so all replicas stay
bit-identical; `Replica.digest` is what they compare every round. Only a join, a rejoin or a digest
mismatch moves a whole replica, as the flat tensor dict of `to_tensors` / `from_tensors`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

Params = dict[str, torch.Tensor]

# Prefixes of the flat form: one namespace per part of the replica.
_PARTS = ("params", "momentum", "downlink_shift")


def digest(params: Params) -> str:
    """sha256 (hex) over the sorted names, dtypes, shapes and raw bytes of a tensor dict.

    Bit-identical states hash equal; any difference in a bit, a name, a dtype or a shape changes it.
    Every field is length-prefixed, so no two different states can frame to the same byte string.
    """
    h = hashlib.sha256(b"lowband-state-v1\0")
    for name in sorted(params):
        tensor = params[name]
        header = f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0{tensor.numel() * tensor.element_size()}\0"
        encoded = header.encode()
        h.update(len(encoded).to_bytes(8, "little"))
        h.update(encoded)
        flat = tensor.detach().cpu().resolve_conj().resolve_neg().contiguous().reshape(-1)
        h.update(flat.view(torch.uint8).numpy().data)
    return h.hexdigest()


@dataclass(frozen=True)
class Replica:
    """round: rounds applied so far (the replica round r+1 is round r's aggregate applied).
    params: name -> global parameter. momentum: name -> outer momentum buffer (float32 or wider; absent
    before a tensor's first outer step). outer_steps: outer steps taken. downlink_shift: name -> the
    downlink mirror's h (ef21 / econtrol downlinks only)."""

    round: int
    params: Params
    momentum: Params = field(default_factory=dict)
    outer_steps: int = 0
    downlink_shift: Params = field(default_factory=dict)

    def digest(self) -> str:
        return digest(self.to_tensors())

    def copy(self) -> Replica:
        """The same replica in tensors of its own (a reader that keeps it while the coordinator steps its own in
        place: protocols/round.py `lend`)."""
        return Replica.from_tensors({name: t.clone() for name, t in self.to_tensors().items()})

    def to_tensors(self) -> Params:
        """The whole replica as one flat dict (round and outer steps as 0-d int64 tensors)."""
        out: Params = {"round": torch.tensor(self.round), "outer_steps": torch.tensor(self.outer_steps)}
        for part in _PARTS:
            out.update({f"{part}/{name}": t for name, t in getattr(self, part).items()})
        return out

    @classmethod
    def from_tensors(cls, flat: Params) -> Replica:
        """Inverse of `to_tensors`; ValueError naming what is missing or unknown."""
        for key in ("round", "outer_steps"):
            if key not in flat or flat[key].numel() != 1:
                raise ValueError(f"replica state lacks the scalar {key!r}")
        parts: dict[str, Params] = {part: {} for part in _PARTS}
        for key, tensor in flat.items():
            if key in ("round", "outer_steps"):
                continue
            part, sep, name = key.partition("/")
            if not sep or part not in parts:
                raise ValueError(f"replica state has an unknown entry {key!r}")
            parts[part][name] = tensor
        if not parts["params"]:
            raise ValueError("replica state has no parameters")
        return cls(int(flat["round"]), parts["params"], parts["momentum"], int(flat["outer_steps"]),
                   parts["downlink_shift"])
