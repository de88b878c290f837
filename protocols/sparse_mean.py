"""The per-coordinate mean over senders that SparseLoCo's aggregator folds sparse updates into.

Memory is the point here: the coordinator keeps one of these per open round, and a dense one (a float32 sum and
a float32 sender weight per coordinate) is twice the model, the largest thing it holds after the replica. While
the senders' coordinates are few it keeps only those (sorted flat indices, their sums and weights: 16 bytes
each), and turns dense (8 bytes per model coordinate) once they pass an eighth of the model (`SPARSE_UP_TO`).
Both forms add every coordinate's values in fold order starting from 0.0 with `index_add_`, so their sums,
weights and means are the same bits (tests/unit/test_sparse_mean.py pins it against a plain dense fold).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch

from protocols.base import Accumulator, CheckedUpdate, Decoded, View
from protocols.replica import Params
from protocols.sorting import argsort

# Elements per slice when dividing the dense sums by the weights: the division's temporaries stay this small
# instead of two more copies of the model.
MEAN_SLICE = 1 << 20
# Sparse while at most 1/SPARSE_UP_TO of the model's coordinates were sent: 16 bytes each, a quarter of the dense
# form's 8 per model coordinate at most, and each merge sorts no more than that.
SPARSE_UP_TO = 8


@dataclass
class SparseMeanAccumulator(Accumulator):
    """Per coordinate, the weighted mean over the workers that sent it (0 where nobody did), or with
    `over_all_workers`, the sum divided by every worker's weight (the paper's (1/R) sum_r, which damps
    coordinates only a few workers chose).

    Keeps a running sum and a running sender weight per coordinate sent so far: sparse while few were
    (`sparse`, up to 1/SPARSE_UP_TO of them), else twice the model in float32 (`sums`, `weights`), whatever
    the number of workers.
    """

    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    workers: list[str] = field(default_factory=list)
    over_all_workers: bool = False
    total_weight: float = 0.0
    # The first update's tensors laid out end to end (name -> offset, total elements): every update that names
    # only those folds with one index_add into the sparse or the flat dense form.
    _offsets: dict[str, int] = field(default_factory=dict, repr=False)
    _numel: int = field(default=0, repr=False)
    # Sparse form over that layout: (sorted unique flat int64 indices, their sums, their weights).
    _sparse: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)
    # Dense form: (flat sums, flat weights) over that layout, and name -> view of each (plus tensors outside it).
    _flat: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)
    _sums: Params = field(default_factory=dict, repr=False)
    _weights: Params = field(default_factory=dict, repr=False)

    view: ClassVar[View] = "coordinates"

    @property
    def sums(self) -> Params:
        """name -> flat float32 [numel] running sums (makes the accumulator dense)."""
        self._densify()
        return self._sums

    @property
    def weights(self) -> Params:
        """name -> flat float32 [numel] sender weight per coordinate (makes the accumulator dense)."""
        self._densify()
        return self._weights

    @property
    def sparse(self) -> bool:
        return self._sparse is not None

    @property
    def count(self) -> int:
        return len(self.workers)

    def add(
        self, name: str, shape: tuple[int, ...], indices: torch.Tensor, values: torch.Tensor, weight: float
    ) -> None:
        self._densify()
        if name not in self._sums:
            numel = int(torch.Size(shape).numel())
            self._sums[name] = torch.zeros(numel, device=values.device)
            self._weights[name] = torch.zeros(numel, device=values.device)
            self.shapes[name] = tuple(shape)
        self._sums[name].index_add_(0, indices, values * weight)
        self._weights[name].index_add_(0, indices, torch.full_like(values, weight))

    def fold(self, worker_id: str, update: CheckedUpdate) -> None:
        if not self._offsets and not self._sums and update.tensors:
            self._lay_out(update)
        if update.tensors and all(n in self._offsets for n in update.tensors):
            # One index_add for all tensors: bit for bit the per-tensor adds, since an update names each
            # coordinate once (check_update refuses repeats).
            indices = torch.cat([_indices(d) + self._offsets[n] for n, d in update.tensors.items()])
            values = torch.cat([d.values for d in update.tensors.values()])
            if self._sparse is not None:
                # The check's sort of these very indices, where it laid the tensors out as this layout does.
                presorted = update.order is not None and list(update.tensors) == list(self._offsets)
                if presorted:
                    assert update.order is not None
                    indices, values = indices[update.order], values[update.order]
                self._fold_sparse(indices, values * update.weight, torch.full_like(values, update.weight), presorted)
            else:
                assert self._flat is not None  # laid out, not sparse: dense
                self._flat[0].index_add_(0, indices, values * update.weight)
                self._flat[1].index_add_(0, indices, torch.full_like(values, update.weight))
        else:
            for name, decoded in update.tensors.items():
                self.add(name, decoded.shape, _indices(decoded), decoded.values, update.weight)
        self.workers.append(worker_id)
        self.total_weight += update.weight

    def _lay_out(self, update: CheckedUpdate) -> None:
        at = 0
        for name, decoded in update.tensors.items():
            self._offsets[name] = at
            self.shapes[name] = tuple(decoded.shape)
            at += int(torch.Size(decoded.shape).numel())
        self._numel = at
        values = next(iter(update.tensors.values())).values
        empty = torch.zeros(0, device=values.device)
        self._sparse = (torch.zeros(0, dtype=torch.int64, device=values.device), empty, empty)

    def _fold_sparse(self, indices: torch.Tensor, sums: torch.Tensor, weights: torch.Tensor,
                     presorted: bool = False) -> None:
        """Merge one update's (indices, weighted values, weights) into the sparse form (`presorted`: the indices
        ascend already). A coordinate kept already gets its value added in place (old sum + new value, as in the
        dense form); one sent for the first time joins the sorted indices with 0.0 + its value (as in the dense
        form, whose sums start at 0.0), and the kept sums move over as 0.0 + themselves (the same value: a sum of
        adds from 0.0 is never -0.0)."""
        assert self._sparse is not None
        kept, kept_sums, kept_weights = self._sparse
        # Sorted first: searching sorted keys in the sorted kept indices is several times faster than searching
        # them in arrival order (measured: the fold runs under the coordinator's state lock).
        if not presorted:
            order = argsort(indices)
            indices, sums, weights = indices.to(torch.int64)[order], sums[order], weights[order]
        if kept.numel():
            at = _search(kept, indices).clamp_(max=kept.numel() - 1)
            present = kept[at] == indices
            if bool(present.all()):  # every coordinate kept already: the common case once a round has started
                kept_sums.index_add_(0, at, sums)
                kept_weights.index_add_(0, at, weights)
                return
            kept_sums.index_add_(0, at[present], sums[present])
            kept_weights.index_add_(0, at[present], weights[present])
            fresh = ~present
            indices, sums, weights = indices[fresh], sums[fresh], weights[fresh]
        if indices.numel():
            # A merge of two ascending, disjoint index lists: each entry's place in the union is its rank in its own
            # list plus how many of the other's are smaller. No sort of the union, and of temporaries only the
            # places (8 bytes an entry; a sort of the concatenation held five such arrays at once).
            kept_at = _search(indices, kept).add_(torch.arange(kept.numel(), device=kept.device))
            fresh_at = _search(kept, indices).add_(torch.arange(indices.numel(), device=indices.device))
            union = torch.empty(kept.numel() + indices.numel(), dtype=kept.dtype, device=kept.device)
            union.index_copy_(0, kept_at, kept).index_copy_(0, fresh_at, indices)
            merged = []
            for old, new in ((kept_sums, sums), (kept_weights, weights)):
                total = torch.zeros(union.numel(), dtype=old.dtype, device=old.device)
                total.index_add_(0, kept_at, old)
                merged.append(total.index_add_(0, fresh_at, new))
            self._sparse = (union, merged[0], merged[1])
            if SPARSE_UP_TO * union.numel() > self._numel:
                self._densify()

    def _densify(self) -> None:
        """Turn the sparse form into the dense one (the same values: unsent coordinates are 0.0 in both)."""
        if self._sparse is None:
            return
        indices, sums, weights = self._sparse
        flat = []
        for values in (sums, weights):
            dense = torch.zeros(self._numel, dtype=values.dtype, device=values.device)
            flat.append(dense.index_copy_(0, indices, values))
        self._flat, self._sparse = (flat[0], flat[1]), None
        for name, at in self._offsets.items():
            numel = int(torch.Size(self.shapes[name]).numel())
            self._sums[name], self._weights[name] = flat[0][at : at + numel], flat[1][at : at + numel]

    def mean(self) -> Mapping[str, torch.Tensor]:
        """name -> the mean tensor: while sparse a `SparseMean`, which builds each tensor as it is read (a dense
        copy of the model is never held at once); else views of one flat dense tensor."""
        if not self.workers:
            raise ValueError("no updates were folded into this round")
        if self._sparse is not None:
            indices, sums, weights = self._sparse
            return SparseMean(indices, self._divide(sums, weights), dict(self._offsets), dict(self.shapes))
        if self._flat is not None and len(self._offsets) == len(self._sums):  # every tensor in the flat layout
            return self._split(self._divide(*self._flat))
        return {name: self._divide(total, self._weights[name]).view(self.shapes[name])
                for name, total in self._sums.items()}

    def _divide(self, total: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Each sum over its coordinate's sender weight (unsent coordinates have sum 0 and weight 0: divided by
        1 they stay exactly 0), or over every worker's weight; slice by slice, into one new tensor."""
        out = torch.empty_like(total)
        for at in range(0, total.numel(), MEAN_SLICE):
            part = slice(at, at + MEAN_SLICE)
            if self.over_all_workers:
                torch.div(total[part], self.total_weight, out=out[part])
            else:
                w = weight[part]
                torch.div(total[part], torch.where(w > 0, w, torch.ones_like(w)), out=out[part])
        return out

    def _split(self, flat: torch.Tensor) -> Params:
        return {name: flat[at : at + int(torch.Size(self.shapes[name]).numel())].view(self.shapes[name])
                for name, at in self._offsets.items()}


class SparseMean(Mapping[str, torch.Tensor]):
    """A sparse accumulator's mean: the coordinates sent (sorted flat indices over the accumulator's layout) and
    their means. Reading a name builds that tensor dense, the same bits the dense form's mean has there (unsent
    coordinates 0.0); `nonzero(name)` gives its nonzero entries without building it, which is what a sparse
    downlink sends (protocols/downlink.py `union_payload`). So a round's close never holds a dense mean of the
    whole model: one was 1x the model at the coordinator's peak (bench/coordinator_memory.py)."""

    def __init__(self, indices: torch.Tensor, means: torch.Tensor, offsets: dict[str, int],
                 shapes: dict[str, tuple[int, ...]]) -> None:
        self._indices, self._means = indices, means  # [sent] int64 ascending, [sent] float32
        self._offsets, self._shapes = offsets, shapes

    def _span(self, name: str) -> tuple[torch.Tensor, torch.Tensor, int]:
        """name's sent coordinates (indices into the flat tensor, ascending), their means, and its numel."""
        at, numel = self._offsets[name], int(torch.Size(self._shapes[name]).numel())
        bounds = _search(self._indices, torch.tensor([at, at + numel], dtype=self._indices.dtype))
        lo, hi = int(bounds[0]), int(bounds[1])
        return self._indices[lo:hi] - at, self._means[lo:hi], numel

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def nonzero(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """([nnz] int64 ascending flat indices, [nnz] values) of name's nonzero means: exactly
        `torch.nonzero(self[name].reshape(-1))` and the values there (a NaN counts as nonzero, as there)."""
        local, means, _ = self._span(name)
        keep = means != 0
        return local[keep], means[keep]

    def __getitem__(self, name: str) -> torch.Tensor:
        local, means, numel = self._span(name)
        dense = torch.zeros(numel, dtype=means.dtype, device=means.device)
        return dense.index_copy_(0, local, means).view(self._shapes[name])

    def __iter__(self) -> Iterator[str]:
        return iter(self._offsets)

    def __len__(self) -> int:
        return len(self._offsets)


def _search(sorted_: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """torch.searchsorted of sorted keys; on the CPU numpy's, which walks sorted keys along the array instead of
    searching each from scratch (measured 2x faster at this bench's sizes)."""
    if sorted_.device.type != "cpu":
        return torch.searchsorted(sorted_, keys)
    return torch.from_numpy(np.searchsorted(sorted_.numpy(), keys.numpy()))


def _indices(decoded: Decoded) -> torch.Tensor:
    assert decoded.indices is not None  # the "coordinates" view
    return decoded.indices
