"""Per-client state of a simulation (error feedback, DP accountant, ...): in memory, spilled to disk.

10,000 simulated clients must not need 10,000 models' worth of memory. The store keeps the most recently
used clients' states in memory up to a byte budget and writes the least recently used ones to one file each
under `spill_dir`, reading them back when the client is sampled again. A client never seen has no state.
"""

from __future__ import annotations

import pickle
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch


def state_bytes(state: Any) -> int:
    """Bytes a state holds: its tensors' storage plus the pickled size of everything else."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(state_bytes(v) for v in state.values()) + 64 * len(state)
    if isinstance(state, list | tuple):
        return sum(state_bytes(v) for v in state) + 16 * len(state)
    return len(pickle.dumps(state))


class ClientStore:
    def __init__(self, budget_bytes: int, spill_dir: str | Path) -> None:
        if budget_bytes < 0:
            raise ValueError(f"budget_bytes must be >= 0, got {budget_bytes}")
        self.budget = budget_bytes
        self.spill_dir = Path(spill_dir)
        self._memory: OrderedDict[int, tuple[Any, int]] = OrderedDict()  # client -> (state, bytes), LRU first
        self._on_disk: set[int] = set()
        self.bytes_in_memory = 0
        self.spills = 0  # states written out
        self.loads = 0  # states read back

    def __len__(self) -> int:
        return len(self._memory) + len(self._on_disk)

    def _path(self, client: int) -> Path:
        return self.spill_dir / f"client-{client}.pt"

    def get(self, client: int) -> Any | None:
        """The client's state (now the most recently used), or None for a client never stored."""
        if client in self._memory:
            self._memory.move_to_end(client)
            return self._memory[client][0]
        if client in self._on_disk:
            state = torch.load(self._path(client), weights_only=False)  # our own file
            self._on_disk.discard(client)
            self._path(client).unlink()
            self.loads += 1
            self.put(client, state)
            return state
        return None

    def put(self, client: int, state: Any) -> None:
        if client in self._memory:
            self.bytes_in_memory -= self._memory.pop(client)[1]
        self._on_disk.discard(client)
        size = state_bytes(state)
        self._memory[client] = (state, size)
        self.bytes_in_memory += size
        while self.bytes_in_memory > self.budget and len(self._memory) > 1:
            self._spill_oldest()

    def _spill_oldest(self) -> None:
        client, (state, size) = self._memory.popitem(last=False)
        self.spill_dir.mkdir(parents=True, exist_ok=True)
        torch.save(state, self._path(client))
        self._on_disk.add(client)
        self.bytes_in_memory -= size
        self.spills += 1

    @property
    def spilled(self) -> int:
        """Clients whose state is on disk now."""
        return len(self._on_disk)
