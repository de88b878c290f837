"""The downlink: how a round's aggregate update goes back to every replica, and how replicas apply it.

Three modes, from a `downlink:` config block (codec "auto" = the protocol's paper default):

- dense: the aggregate update as float tensors. Replicas apply exactly what the aggregator computed.
- codec: any registry codec under the aggregator's error feedback (DoubleSqueeze, Tang et al. 2019,
  arXiv:1905.05957; EF21-P, Gruntkowska et al. 2022, arXiv:2209.15218). With EF14 (the default) the
  aggregator keeps the residual of what it did not send and adds it to the next round's update; with
  ef21 / econtrol every replica keeps the receiver shift h (in `Replica.downlink_shift`). Either way the
  aggregator applies the decoded message to its own replica, never the exact update, so the state it
  keeps is exactly the replica every worker holds.
- sparse: for protocols whose aggregate is a function of the folded updates alone (`relayable`), the
  union of the senders' coordinates with their exact aggregated values (per tensor a `topk_global` payload
  of the nonzero entries, float32 values, int32 indices, or the tensor itself where that is no larger:
  `union_payload`), or the senders' payloads relayed for every replica to check and fold again, whichever
  has fewer bytes. Both give every replica the aggregator's update bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch

from compression import registry
from compression.error_feedback import ErrorFeedback, Mirror
from compression.payload import Payload, dense
from protocols.base import Aggregate, Protocol, Update
from protocols.check import check_update, expectation
from protocols.compressed import NO_COMPRESSION, Compression
from protocols.replica import Params, Replica
from protocols.settings import DownlinkConfig
from protocols.sparse_mean import SparseMean

Mode = Literal["dense", "codec", "sparse"]


def union_payload(update: torch.Tensor) -> Payload:
    """The nonzero entries of a float tensor as a `topk_global` payload (int32 indices, exact values), or the
    tensor itself (`dense`) once an index per entry makes that no smaller: at float32 past half the entries
    nonzero, which many senders' distinct top-k masks soon are. So a union is never larger than the dense
    update (`protocols.round.union_bound`), on the wire and in what a round keeps for relaying."""
    flat = update.detach().reshape(-1).contiguous()
    indices = torch.nonzero(flat, as_tuple=False).reshape(-1)
    return _union(tuple(update.shape), update.dtype, indices, lambda: flat[indices], lambda: update)


def _union(shape: tuple[int, ...], dtype: torch.dtype, indices: torch.Tensor, values: Callable[[], torch.Tensor],
           whole: Callable[[], torch.Tensor]) -> Payload:
    """`union_payload` of a tensor given its nonzero entries' flat indices, their values and the whole tensor
    (each asked for only when it is sent)."""
    numel, itemsize = math.prod(shape), dtype.itemsize
    if numel >= 1 << 31:
        raise ValueError(f"a sparse downlink indexes with int32; tensor has {numel} elements")
    if indices.numel() * (4 + itemsize) >= numel * itemsize:
        return dense(whole())
    return Payload(
        "topk_global", shape, dtype,
        tensors={"indices": indices.to(torch.int32), "values": values()},
        meta={"k": int(indices.numel()), "value_dtype": str(dtype).removeprefix("torch.")},
    )


def _union_of(update: Mapping[str, torch.Tensor], name: str) -> Payload:
    """name's tensor of a round's update as `union_payload`; from a sparse mean's own entries, without building
    the tensor dense, where it is one (the same payload: tests/unit/test_sparse_mean.py)."""
    if not isinstance(update, SparseMean):
        return union_payload(update[name])
    indices, values = update.nonzero(name)
    shape = update.shape(name)
    return _union(shape, values.dtype, indices, lambda: values, lambda: update[name])


@dataclass(frozen=True)
class Downlink:
    mode: Mode = "dense"
    compression: Compression = NO_COMPRESSION

    @classmethod
    def of(cls, settings: Any, protocol: Protocol[Any, Any]) -> Downlink:
        """The downlink of a coordinated `protocol:` section (every such section has a `downlink:` block)."""
        return cls.from_config(settings.downlink, protocol)

    @classmethod
    def from_config(cls, cfg: DownlinkConfig, protocol: Protocol[Any, Any]) -> Downlink:
        codec = protocol.default_downlink if cfg.codec == "auto" else cfg.codec
        if codec == "sparse":
            if not protocol.relayable:
                raise ValueError(
                    f"protocol.downlink.codec 'sparse' needs an aggregate computed from the folded updates alone; "
                    f"{protocol.kind} with this compression keeps per-worker shifts: use a codec or 'none'"
                )
            return cls("sparse")
        if registry.ALIASES.get(codec, codec) == "dense":
            return cls("dense")
        return cls("codec", Compression.from_config(cfg.model_copy(update={"codec": codec}), "protocol.downlink"))

    @property
    def may_relay(self) -> bool:
        return self.mode == "sparse"

    @property
    def keeps_shift(self) -> bool:
        return self.mode == "codec" and self.compression.keeps_shift

    def init_state(self) -> ErrorFeedback | None:
        """The aggregator's encoder state (error feedback residual or shift); None for dense and sparse."""
        return self.compression.new_feedback() if self.mode == "codec" else None

    def encode(
        self, round_: int, update: Mapping[str, torch.Tensor], relayed: tuple[Update, ...] | None,
        state: ErrorFeedback | None,
    ) -> tuple[Aggregate, ErrorFeedback | None]:
        """The round's aggregate message and the next encoder state (`state` is not modified). `relayed`: the
        senders' updates a sparse downlink may relay instead of the union, or None when relaying them could
        not be smaller (`protocols.round.union_bound`)."""
        if self.mode == "dense":
            return Aggregate(round_, {n: dense(t) for n, t in update.items()}), state
        if self.mode == "sparse":
            union = Aggregate(round_, {n: _union_of(update, n) for n in update})
            if relayed is None:
                return union, state
            relay = Aggregate(round_, relayed=relayed)
            return (relay if relay.nbytes() < union.nbytes() else union), state
        if not isinstance(state, ErrorFeedback):
            raise TypeError(f"a codec downlink needs its ErrorFeedback state, got {type(state).__name__}")
        feedback = self.compression.new_feedback()
        feedback.load_state_dict(state.state_dict())  # step() rebinds its buffers: the old state stays intact
        return Aggregate(round_, {n: feedback.step(n, t) for n, t in update.items()}), feedback

    def decode(
        self, protocol: Protocol[Any, Any], aggregate: Aggregate, replica: Replica
    ) -> tuple[Mapping[str, torch.Tensor], Params]:
        """(the update every replica applies, the replica's next downlink shift). Without a shift the update is
        `DecodedOnRead`: each tensor decoded, and checked finite, when the outer step reads it."""
        if aggregate.relayed:
            if self.mode != "sparse":
                raise ValueError(f"a {self.mode} downlink received relayed updates")
            acc = protocol.new_round()
            expect = expectation(protocol, replica, type(acc).view)
            for i, update in enumerate(aggregate.relayed):
                acc.fold(f"relayed{i}", check_update(f"relayed{i}", update, expect))
            update_, _ = protocol.close(acc, protocol.init_aggregator_state(replica))
            # Built once: a sparse mean builds each tensor anew as it is read, and the check and the step both read.
            return dict(update_.items()), replica.downlink_shift
        unknown = sorted(set(aggregate.payloads) - set(replica.params))
        if unknown:
            raise ValueError(f"the aggregate names tensors the replica lacks: {unknown}")
        if not self.keeps_shift:
            return DecodedOnRead(aggregate.payloads), replica.downlink_shift
        decoded = {n: registry.decode(p) for n, p in aggregate.payloads.items()}
        mirror = Mirror(self.compression.error_feedback)
        mirror.load_state_dict(dict(replica.downlink_shift))
        return {n: mirror.update(n, d) for n, d in decoded.items()}, mirror.state_dict()


def apply_aggregate(
    protocol: Protocol[Any, Any], downlink: Downlink, aggregate: Aggregate, replica: Replica, in_place: bool = False
) -> Replica:
    """The replica after `aggregate`: the same pure code on every worker and on the aggregator (`in_place`:
    see `apply_update`)."""
    if aggregate.round != replica.round:
        raise ValueError(f"the aggregate of round {aggregate.round} cannot apply to a replica at round {replica.round}")
    update, shift = downlink.decode(protocol, aggregate, replica)
    return apply_update(protocol, update, replace(replica, downlink_shift=shift), in_place)


def apply_update(
    protocol: Protocol[Any, Any], update: Mapping[str, torch.Tensor], replica: Replica, in_place: bool = False
) -> Replica:
    """The outer step with an aggregate's decoded update, each tensor checked finite first (a `DecodedOnRead`
    checks each as it is read).

    `in_place`: the same bits, stepped in `replica`'s own tensors where the protocol has such a step
    (`Protocol.apply_in_place`; else a new replica all the same). Only for a caller that holds those tensors
    alone: the coordinator's close, which would otherwise hold the next replica beside the old one, 1x the model
    (bench/coordinator_memory.py). A refusal still changes nothing: the step reads and checks every tensor of the
    update (finite, names, shapes) before it changes one."""
    if not isinstance(update, DecodedOnRead):
        for name, value in update.items():
            _check_finite(name, value)
    stepped = protocol.apply_in_place(update, replica) if in_place else None
    # Else the outer step builds new tensors and the replica is never changed: a refusal midway changes nothing.
    return protocol.apply(update, replica) if stepped is None else stepped


def _check_finite(name: str, value: torch.Tensor) -> torch.Tensor:
    if not bool(torch.isfinite(value).all()):
        raise ValueError(f"the aggregate's update for {name!r} contains NaN or Inf")
    return value


class DecodedOnRead(Mapping[str, torch.Tensor]):
    """An aggregate's payloads as the update's tensors, each decoded (and checked finite) when read and not kept:
    the outer step then holds one decoded tensor at a time beside the old and the new parameters, instead of a
    whole decoded copy of the model (the coordinator's close peaked with all three, bench/coordinator_memory.py).
    A tensor read twice is decoded twice, to the same bits (decoding is pure)."""

    def __init__(self, payloads: Mapping[str, Payload]) -> None:
        self._payloads = payloads

    def __getitem__(self, name: str) -> torch.Tensor:
        return _check_finite(name, registry.decode(self._payloads[name]))

    def __iter__(self) -> Iterator[str]:
        return iter(self._payloads)

    def __len__(self) -> int:
        return len(self._payloads)
