"""The `torch` transport of DESIGN.md: updates move by all-gather inside one cluster, with no coordinator.

Every rank all-gathers every rank's (compressed) update and then runs the protocol's coordinator half
itself, in rank order: `new_round`, `fold` each update, `aggregate`. The coordinator half is a pure,
deterministic function of (global state, updates in order, server state), so every rank computes the
bit-identical new global state and server state (outer momentum, EControl's mirror, ...) that a gRPC
coordinator folding the same updates in the same order would; `tests/integration/test_allgather.py`
checks this against the real coordinator. The price is that each rank decodes and folds all W updates,
where the star puts that work on one machine.

Bytes are counted with the ring all-gather model (Patarasuk & Yuan 2009), the schedule gloo's and NCCL's
ring all-gather follow: each of the W ranks contributes one block of B bytes, and each rank sends (and
receives) W - 1 blocks, i.e. (W - 1) / W of the W * B gathered bytes. Gloo cannot gather blocks of
unequal size, so every block is padded to the largest: B = max over ranks of the serialized update,
and the padding is counted, since it really crosses the link. The size exchange that precedes it is one
more ring all-gather of 8-byte blocks, also counted.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist

from compression.registry import decode
from protocols.base import Params, Protocol, Update
from protocols.wire import serde

# Largest update (component bytes) accepted from a peer: far above any model this runs, but bounded,
# so a corrupted size field cannot make every rank allocate without limit.
MAX_UPDATE_BYTES = 1 << 40
# torch 2.13 renamed all_gather_into_tensor (now deprecated) to all_gather_single; the project allows older torch.
_gather_into_tensor = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def ring_allgather_bytes(block_bytes: int, world_size: int) -> int:
    """Bytes each rank sends (and receives) to all-gather one `block_bytes` block per rank over a ring."""
    return (world_size - 1) * block_bytes


def _device(group: Any) -> torch.device:
    # NCCL only moves CUDA tensors; gloo moves CPU ones.
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def allgather_bytes_counted(data: bytes, group: Any = None) -> tuple[list[bytes], int]:
    """`allgather_bytes`, plus the bytes this rank sent (ring model, padding and size exchange included)."""
    world = dist.get_world_size(group)
    device = _device(group)
    sizes = torch.zeros(world, dtype=torch.int64, device=device)
    _gather_into_tensor(sizes, torch.tensor([len(data)], dtype=torch.int64, device=device), group=group)
    lengths = [int(n) for n in sizes.cpu()]
    block = max(lengths)
    sent = ring_allgather_bytes(sizes.element_size(), world) + ring_allgather_bytes(block, world)
    if block == 0:
        return [b"" for _ in lengths], sent
    mine = torch.zeros(block, dtype=torch.uint8)
    if data:
        mine[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    gathered = torch.empty(world * block, dtype=torch.uint8, device=device)
    _gather_into_tensor(gathered, mine.to(device), group=group)
    flat = gathered.cpu().numpy()
    return [flat[r * block : r * block + n].tobytes() for r, n in enumerate(lengths)], sent


def allgather_bytes(data: bytes, group: Any = None) -> list[bytes]:
    """Every rank's `data`, by rank, on every rank; the buffers may differ in size (or be empty).

    Sizes are gathered first (one int64 per rank), then every buffer is padded to the largest and the
    padded uint8 tensors are gathered (gloo and NCCL gather equal sizes only) and trimmed back.
    """
    gathered, _ = allgather_bytes_counted(data, group)
    return gathered


def allgather_update(update: Update, group: Any = None) -> list[Update]:
    """Every rank's update (payloads and weight), by rank, on every rank.

    Payloads travel in `serde.update_to_bytes` form: the chunk encoding of the gRPC streams, in one
    checksummed buffer, so they come back bit-identical or raise WireError naming the sender.
    """
    updates, _ = allgather_update_counted(update, group)
    return updates


def allgather_update_counted(update: Update, group: Any = None) -> tuple[list[Update], int]:
    """`allgather_update`, plus the bytes this rank sent for it (see the module docstring)."""
    buffers, sent = allgather_bytes_counted(serde.update_to_bytes(update.payloads, update.weight), group)
    updates = []
    for rank, data in enumerate(buffers):
        try:
            payloads, weight = serde.update_from_bytes(data, MAX_UPDATE_BYTES)
        except serde.WireError as exc:
            raise serde.WireError(f"update from rank {rank}: {exc}") from exc
        updates.append(Update(payloads=payloads, weight=weight))
    return updates, sent


def _check_against_global(rank: int, update: Update, global_: Mapping[str, torch.Tensor]) -> None:
    """The checks the star's coordinator makes (coordinator/validate.py), raising ValueError instead.

    Here no one sits in the middle to refuse a malformed update, so every rank fails alike rather than
    folding it. Decoding each payload once more to look for NaN/Inf costs a pass over the model per
    update; it is what keeps one bad rank from silently poisoning every replica.
    """
    unknown = sorted(set(update.payloads) - set(global_))
    missing = sorted(set(global_) - set(update.payloads))
    if unknown or missing:
        raise ValueError(f"update from rank {rank}: unknown tensor(s) {unknown}, missing tensor(s) {missing}")
    for name, payload in update.payloads.items():
        target = global_[name]
        if payload.shape != tuple(target.shape) or payload.dtype != target.dtype:
            raise ValueError(
                f"update from rank {rank}: {name!r} is {payload.dtype}{list(payload.shape)}, "
                f"the global parameter is {target.dtype}{list(target.shape)}"
            )
        value = decode(payload)  # validates the payload against its own header (PayloadError)
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise ValueError(f"update from rank {rank}: {name!r} contains NaN or Inf")


def decentralized_round(
    protocol: Protocol, global_: Params, my_update: Update, server_state: Any, group: Any = None
) -> tuple[Params, Any, int]:
    """One outer round with no coordinator: all-gather the updates, aggregate them locally in rank order.

    Returns (new global parameters, new server state, bytes this rank sent). Every rank must call it
    with the same `global_` and `server_state` (they stay identical when every rank starts alike) and
    gets the same result back, bit for bit.
    """
    updates, sent = allgather_update_counted(my_update, group)
    for rank, update in enumerate(updates):
        _check_against_global(rank, update, global_)
    acc = protocol.new_round(global_)
    for rank, update in enumerate(updates):
        acc.fold(f"rank{rank}", update)
    new_global, new_state = protocol.aggregate(global_, acc, server_state)
    return new_global, new_state, sent
