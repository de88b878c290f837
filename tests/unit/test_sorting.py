"""`protocols.sorting.argsort`: the permutation that sorts, stable, as int64 (what the check and the fold use)."""

from __future__ import annotations

import torch

from protocols.sorting import argsort


def test_it_sorts_distinct_keys_as_torch_sort_does() -> None:
    for dtype in (torch.int32, torch.int64):
        keys = torch.randperm(100_000, generator=torch.Generator().manual_seed(0))[:5_000].to(dtype)
        order = argsort(keys)
        assert order.dtype == torch.int64
        assert torch.equal(order, torch.sort(keys).indices)
        assert torch.equal(keys[order], torch.sort(keys).values)


def test_equal_keys_keep_their_order() -> None:
    keys = torch.tensor([3, 1, 3, 0, 1, 3])
    assert argsort(keys).tolist() == [3, 1, 4, 0, 2, 5]
    assert argsort(torch.zeros(0, dtype=torch.int64)).numel() == 0
