"""The all-gather transport: updates move by torch collectives inside one cluster, with no coordinator
(gloo on CPU, NCCL on GPU).

Every rank all-gathers every rank's (compressed) update and runs the aggregator half itself
(`protocols.round.RoundAggregator`), in rank order: check, fold, close, downlink. The aggregator is a
pure, deterministic function of (replica, updates in order, aggregator state), so every rank forms the
bit-identical aggregate and replica that a gRPC coordinator folding the same updates in the same order
would; `tests/integration/test_transports.py` checks this. The price is that each rank decodes and folds
all W updates, where the star puts that work on one machine.

Bytes are counted with the ring all-gather model (Patarasuk & Yuan 2009), the schedule gloo's and NCCL's
ring all-gather follow: each of the W ranks contributes one block of B bytes, and each rank sends (and
receives) W - 1 blocks, i.e. (W - 1) / W of the W * B gathered bytes. Gloo cannot gather blocks of
unequal size, so every block is padded to the largest: B = max over ranks of the serialized update,
and the padding is counted, since it really crosses the link. The size exchange that precedes it is one
more ring all-gather of 8-byte blocks, also counted.
"""

from __future__ import annotations

import contextlib
import datetime
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from protocols.base import Protocol, Update
from protocols.config import RunConfig
from protocols.downlink import Downlink
from protocols.replica import Params, Replica, digest
from protocols.round import RoundAggregator, UpdateRejected
from protocols.wire import serde
from worker.spawn import pin_gloo_to_loopback
from worker.transports.base import Handle, RoundResult, RoundStatus, Transport

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


@contextlib.contextmanager
def process_group(
    rank: int, world_size: int, init_method: str, backend: str = "gloo", timeout_s: float = 300.0
) -> Iterator[None]:
    """The default process group for the duration of a `with`; a collective stuck past `timeout_s` raises."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside [0, {world_size})")
    timeout = datetime.timedelta(seconds=timeout_s)
    pin_gloo_to_loopback(init_method)
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size, timeout=timeout)
    try:
        yield
    finally:
        dist.destroy_process_group()


class AllGatherTransport(Transport):
    """One rank's side: every `exchange` all-gathers the updates and closes the round locally."""

    def __init__(self, cfg: RunConfig, protocol: Protocol[Any, Any], rank: int, group: Any = None) -> None:
        self.cfg, self.protocol, self.rank, self.group = cfg, protocol, rank, group
        self.worker_id = f"rank{rank}"
        self.downlink = Downlink.of(cfg.protocol, protocol)
        self._sent = self._received = 0
        self.aggregator: RoundAggregator | None = None

    def start(self, params: Params, base_digest: str = "") -> Replica:
        """Every rank seeds the same model: that is the first replica (checked by digest across ranks, with
        the frozen base's digest under adapters)."""
        digests, sent = allgather_bytes_counted(f"{digest(params)}:{base_digest}".encode(), self.group)
        self._count(sent)
        if len(set(digests)) != 1:
            raise RuntimeError(f"ranks start from different parameters or frozen bases "
                               f"(digests {[d.decode() for d in digests]})")
        self.aggregator = RoundAggregator(self.protocol, self.downlink, Replica(0, params))
        return self.aggregator.replica

    def _count(self, sent: int) -> None:
        self._sent += sent
        self._received += sent  # the ring receives as many blocks as it sends

    def _aggregator(self) -> RoundAggregator:
        if self.aggregator is None:
            raise RuntimeError("the all-gather transport was not started")
        return self.aggregator

    def status(self, after_round: int) -> RoundStatus:
        aggregator = self._aggregator()
        return RoundStatus(aggregator.round, aggregator.round >= self.cfg.rounds, "")

    def exchange(self, round_: int, update: Update, metrics: dict[str, float]) -> Handle[RoundResult]:
        """All-gather the round's updates and aggregate them here (collectives run on the calling thread)."""
        aggregator = self._aggregator()
        if round_ != aggregator.round:
            raise ValueError(f"rank {self.rank} exchanges round {round_}, the ranks are at round {aggregator.round}")
        updates, sent = allgather_update_counted(update, self.group)
        self._count(sent)
        for rank, peer_update in enumerate(updates):
            try:
                aggregator.submit(f"rank{rank}", peer_update, rank)
            except UpdateRejected as err:
                # No one sits in the middle to refuse it, so every rank fails alike rather than folding it.
                raise ValueError(f"update from rank {rank}: {err}") from None
        aggregate = aggregator.close()
        return Handle.completed(RoundResult(True, aggregate, aggregator.replica.digest()))

    def resync(self) -> Replica:
        return self._aggregator().replica
