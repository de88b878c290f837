"""Client partitions for federated simulation: which sample indices each client holds.

Every partitioner returns `list[np.ndarray]`, one sorted int64 array of sample indices per client; together
they cover every sample exactly once (nothing duplicated, nothing dropped). Randomness comes only from
`np.random.default_rng(seed)`, so a seed gives the same split on every machine and run.

- `iid`: a seeded permutation cut into `n_clients` near-equal parts (sizes differ by at most one).
- `dirichlet`: label skew of Hsu, Qi & Brown 2019 (arXiv:1909.06335): for every class, client proportions
  p ~ Dir(alpha * 1) and the class's shuffled samples are cut at the cumulative proportions. Small alpha:
  each client holds a few classes; large alpha: close to iid. A client left with fewer than `min_size`
  samples makes the whole draw start again (as in NIID-Bench, Li et al. 2021), up to `max_attempts` draws
  from the same stream (10 by default: with far more clients than samples, as 1,000 digits clients, no draw
  ever satisfies it, and each costs time before the first round); if every draw falls short, the last one
  is topped up: each short client takes seeded random samples from whichever client is largest at that
  moment until it holds min_size.
- `by_group`: one client per distinct group id (a play, a speaking role), or, given `n_clients`, whole groups
  dealt largest first to the lightest client (`worker.data.deal_plays`): a group is never split.
- `pathological`: McMahan et al. 2017 (arXiv:1602.05629): samples sorted by label (seeded order inside a
  class), cut into n_clients * classes_per_client shards, dealt at random, classes_per_client to a client.
  A client dealt two shards of one class (by the shard's majority label) then swaps one of them with another
  client where the swap leaves both with no repeat, so that whenever the shards align with the classes (and
  no class has more shards than there are clients) every client sees exactly classes_per_client classes.
- `partition(kind, ...)`: one entry point for the `simulation.partition` kinds; by_play and by_role are
  by_group over the play or role id of every sample.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from worker.data import deal_plays

Parts = list[np.ndarray]
KINDS = ("iid", "dirichlet", "by_play", "by_role", "pathological")


def _check_clients(n_samples: int, n_clients: int) -> None:
    if n_clients < 1:
        raise ValueError(f"n_clients must be >= 1, got {n_clients}")
    if n_clients > n_samples:
        raise ValueError(f"n_clients ({n_clients}) exceeds n_samples ({n_samples}): some client would get nothing")


def _labels(labels: Sequence[int] | np.ndarray) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"labels must be a 1-D integer array, got shape {arr.shape} dtype {arr.dtype}")
    return arr


def _sorted(parts: list[Any]) -> Parts:
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def iid(n_samples: int, n_clients: int, seed: int) -> Parts:
    """A seeded permutation of range(n_samples) cut into n_clients parts of near-equal size."""
    _check_clients(n_samples, n_clients)
    perm = np.random.default_rng(seed).permutation(n_samples)
    return _sorted(np.array_split(perm, n_clients))


def dirichlet(
    labels: Sequence[int] | np.ndarray, n_clients: int, alpha: float, seed: int, min_size: int = 1,
    max_attempts: int = 10,
) -> Parts:
    """Per class, client shares ~ Dir(alpha); every client gets >= min_size samples (see the module docstring)."""
    y = _labels(labels)
    _check_clients(len(y), n_clients)
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if min_size < 0 or min_size * n_clients > len(y):
        raise ValueError(f"min_size must lie in [0, n_samples / n_clients = {len(y) // n_clients}], got {min_size}")
    if max_attempts < 1:
        raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
    rng = np.random.default_rng(seed)
    classes = [np.flatnonzero(y == c) for c in np.unique(y)]
    for _ in range(max_attempts):
        parts: list[list[int]] = [[] for _ in range(n_clients)]
        for idx in classes:
            shares = rng.dirichlet(np.full(n_clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(np.int64)
            for k, piece in enumerate(np.split(rng.permutation(idx), cuts)):
                parts[k].extend(piece.tolist())
        if min(len(p) for p in parts) >= min_size:
            return _sorted(parts)
    for k in range(n_clients):  # every draw left someone short: top the last one up from the largest
        while len(parts[k]) < min_size:
            donor = max(range(n_clients), key=lambda j: (len(parts[j]), -j))
            parts[k].append(parts[donor].pop(int(rng.integers(len(parts[donor])))))
    return _sorted(parts)


def by_group(groups: Sequence[Any] | np.ndarray, n_clients: int | None = None) -> Parts:
    """One client per distinct group id (sorted ids), or whole groups dealt to n_clients, largest first."""
    ids, inverse, sizes = np.unique(np.asarray(groups), return_inverse=True, return_counts=True)
    members = [np.flatnonzero(inverse == g) for g in range(len(ids))]
    if n_clients is None:
        return _sorted(members)
    if not 1 <= n_clients <= len(ids):
        raise ValueError(f"n_clients must lie in [1, {len(ids)} groups] for a split by group, got {n_clients}")
    dealt = deal_plays(sizes.tolist(), n_clients)
    return _sorted([np.concatenate([members[g] for g in owned]) for owned in dealt])


def pathological(labels: Sequence[int] | np.ndarray, n_clients: int, classes_per_client: int, seed: int) -> Parts:
    """McMahan et al.'s shards: sort by label, cut n_clients * classes_per_client shards, deal
    classes_per_client to each client, repairing repeated classes by swaps (see the module docstring)."""
    classes, y = np.unique(_labels(labels), return_inverse=True)  # y: class ranks 0..n_classes-1
    n_classes = len(classes)
    if not 1 <= classes_per_client <= n_classes:
        raise ValueError(f"classes_per_client must lie in [1, {n_classes} classes], got {classes_per_client}")
    n_shards = n_clients * classes_per_client
    _check_clients(len(y), n_clients)
    if n_shards > len(y):
        raise ValueError(f"n_clients * classes_per_client ({n_shards}) exceeds n_samples ({len(y)})")
    rng = np.random.default_rng(seed)
    shuffled = rng.permutation(len(y))
    order = shuffled[np.argsort(y[shuffled], kind="stable")]  # by label, seeded order inside a class
    shards = np.array_split(order, n_shards)
    major = [int(np.bincount(y[s]).argmax()) for s in shards]
    deal = rng.permutation(n_shards).reshape(n_clients, classes_per_client)  # deal[k] = client k's shards
    for k in range(n_clients):
        for slot in range(classes_per_client):
            if [major[s] for s in deal[k]].count(major[deal[k, slot]]) > 1:
                _swap_out(deal, major, k, slot, rng)
    return _sorted([np.concatenate([shards[s] for s in deal[k]]) for k in range(n_clients)])


def _swap_out(deal: np.ndarray, major: list[int], k: int, slot: int, rng: np.random.Generator) -> None:
    """Swap client k's shard in `slot` (of a class k holds twice) for a shard of another client m whose class
    k lacks, provided m holds no other shard of the class it receives: k loses a repeat and m gains none.
    Left as it is if no such swap exists."""
    a = deal[k, slot]
    mine = {major[s] for s in deal[k]}
    for m in rng.permutation(len(deal)):
        if m == k:
            continue
        for other in range(deal.shape[1]):
            rest = {major[s] for j, s in enumerate(deal[m]) if j != other}
            if major[deal[m, other]] not in mine and major[a] not in rest:
                deal[k, slot], deal[m, other] = deal[m, other], a
                return


def partition(
    kind: str, *, n_clients: int | None = None, seed: int = 0, n_samples: int | None = None,
    labels: Sequence[int] | np.ndarray | None = None, groups: Sequence[Any] | np.ndarray | None = None,
    alpha: float = 0.5, classes_per_client: int = 2, min_size: int = 1,
) -> Parts:
    """The split `kind` (iid | dirichlet | by_play | by_role | pathological). iid needs n_samples (or labels or
    groups to count); dirichlet and pathological need labels; by_play and by_role need groups (the play or role
    id of every sample) and take n_clients None as one client per group. Arguments a kind does not use are
    ignored, so a caller can pass its whole config."""
    if kind not in KINDS:
        raise ValueError(f"partition kind must be one of {', '.join(KINDS)}; got {kind!r}")
    if kind in ("by_play", "by_role"):
        if groups is None:
            raise ValueError(f"partition {kind!r} needs groups (the {kind[3:]} id of every sample)")
        return by_group(groups, n_clients)
    if n_clients is None:
        raise ValueError(f"partition {kind!r} needs n_clients")
    if kind == "iid":
        counted = next((len(a) for a in (labels, groups) if a is not None), None) if n_samples is None else n_samples
        if counted is None:
            raise ValueError("partition 'iid' needs n_samples (or labels or groups to count them)")
        return iid(counted, n_clients, seed)
    if labels is None:
        raise ValueError(f"partition {kind!r} needs labels")
    if kind == "dirichlet":
        return dirichlet(labels, n_clients, alpha, seed, min_size=min_size)
    return pathological(labels, n_clients, classes_per_client, seed)
