"""Client partitions: exact cover, seeds, Dirichlet statistics, pathological shards, groups, bad arguments."""

from __future__ import annotations

import numpy as np
import pytest

from worker.federated.partition import by_group, dirichlet, iid, partition, pathological

LABELS = np.repeat(np.arange(10), 60)  # 600 samples, 10 balanced classes


def skewed_labels(n: int = 1000, seed: int = 1) -> np.ndarray:
    """Unbalanced classes (prior ~ 1..10), shuffled."""
    rng = np.random.default_rng(seed)
    return rng.choice(10, size=n, p=np.arange(1, 11) / 55.0)


def assert_exact_cover(parts: list[np.ndarray], n: int) -> None:
    everything = np.concatenate(parts)
    assert everything.dtype == np.int64
    assert len(everything) == n, "a sample is duplicated or dropped"
    assert np.array_equal(np.sort(everything), np.arange(n))


def split_all(seed: int) -> dict[str, list[np.ndarray]]:
    y = skewed_labels()
    groups = np.arange(len(y)) % 37
    return {
        "iid": iid(len(y), 7, seed),
        "dirichlet": dirichlet(y, 7, 0.3, seed, min_size=5),
        "pathological": pathological(y, 7, 3, seed),
        "by_group": by_group(groups, 5),
        "by_group_each": by_group(groups),
    }


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_partitioner_covers_every_index_exactly_once(seed: int) -> None:
    for name, parts in split_all(seed).items():
        assert_exact_cover(parts, 1000)
        assert all(len(p) > 0 for p in parts), name


def test_same_seed_same_split_other_seed_other_split() -> None:
    a, b, c = split_all(0), split_all(0), split_all(1)
    for name in ("iid", "dirichlet", "pathological"):
        assert all(np.array_equal(x, y) for x, y in zip(a[name], b[name], strict=True)), name
        assert not all(np.array_equal(x, y) for x, y in zip(a[name], c[name], strict=True)), name


def test_iid_sizes_differ_by_at_most_one() -> None:
    sizes = [len(p) for p in iid(103, 10, 0)]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == 103


def test_dirichlet_client_proportions_approach_the_class_prior_on_average() -> None:
    y = skewed_labels()
    prior = np.bincount(y, minlength=10) / len(y)
    counts = np.zeros((5, 10))
    for seed in range(300):
        for k, part in enumerate(dirichlet(y, 5, 0.5, seed)):
            counts[k] += np.bincount(y[part], minlength=10)
    per_client = counts / counts.sum(axis=1, keepdims=True)
    assert np.abs(per_client - prior).max() < 0.03
    # a single draw with this alpha is far from the prior: the average is what converges
    one = np.array([np.bincount(y[p], minlength=10) / len(p) for p in dirichlet(y, 5, 0.5, 0)])
    assert np.abs(one - prior).max() > 0.1


def mean_label_entropy(parts: list[np.ndarray], y: np.ndarray) -> float:
    ents = []
    for p in parts:
        q = np.bincount(y[p], minlength=10) / len(p)
        q = q[q > 0]
        ents.append(float(-(q * np.log(q)).sum()))
    return float(np.mean(ents))


def test_small_alpha_skews_labels_far_more_than_large_alpha() -> None:
    y = LABELS
    low = np.mean([mean_label_entropy(dirichlet(y, 10, 0.05, s), y) for s in range(5)])
    high = np.mean([mean_label_entropy(dirichlet(y, 10, 100.0, s), y) for s in range(5)])
    assert high > np.log(10) - 0.15  # near uniform over 10 classes
    assert low < 0.5 * high


def test_dirichlet_guarantees_min_size_even_when_every_draw_falls_short() -> None:
    y = LABELS
    parts = dirichlet(y, 50, 0.01, 0, min_size=10, max_attempts=1)  # alpha 0.01: one draw can't satisfy this
    assert_exact_cover(parts, len(y))
    assert min(len(p) for p in parts) >= 10


def test_pathological_gives_each_client_exactly_its_classes_when_shards_align() -> None:
    for n_clients, cpc in [(10, 1), (10, 2), (20, 2), (100, 2), (30, 3)]:
        y = np.repeat(np.arange(10), 3 * n_clients * cpc)  # every shard lies within one class
        for seed in range(3):
            parts = pathological(y, n_clients, cpc, seed)
            assert_exact_cover(parts, len(y))
            assert [len(np.unique(y[p])) for p in parts] == [cpc] * n_clients
            assert len({len(p) for p in parts}) == 1


def test_pathological_pairs_classes_at_random() -> None:
    y = np.repeat(np.arange(10), 60)
    sets = {frozenset(np.unique(y[p]).tolist()) for s in range(5) for p in pathological(y, 50, 2, s)}
    assert len(sets) > 15  # many distinct pairs of the 45 possible, not a fixed pattern


def test_by_group_never_splits_a_group_and_balances() -> None:
    groups = np.array(["b"] * 50 + ["a"] * 30 + ["c"] * 20 + ["d"] * 20 + ["e"] * 10)
    each = by_group(groups)
    assert [sorted(set(groups[p].tolist())) for p in each] == [["a"], ["b"], ["c"], ["d"], ["e"]]
    dealt = by_group(groups, 2)
    assert_exact_cover(dealt, len(groups))
    owners = {g: [k for k, p in enumerate(dealt) if g in groups[p]] for g in "abcde"}
    assert all(len(o) == 1 for o in owners.values()), owners
    assert sorted(len(p) for p in dealt) == [60, 70]  # b(50)->0, a(30)->1, c(20)->1, d(20)->0, e(10)->1


@pytest.mark.parametrize(
    ("call", "named"),
    [
        (lambda: dirichlet(LABELS, 5, 0.0, 0), "alpha"),
        (lambda: dirichlet(LABELS, 5, -1.0, 0), "alpha"),
        (lambda: iid(5, 6, 0), "n_clients"),
        (lambda: iid(5, 0, 0), "n_clients"),
        (lambda: dirichlet(LABELS, 601, 1.0, 0), "n_clients"),
        (lambda: dirichlet(LABELS, 10, 1.0, 0, min_size=61), "min_size"),
        (lambda: dirichlet(LABELS.astype(float), 10, 1.0, 0), "labels"),
        (lambda: pathological(LABELS, 10, 0, 0), "classes_per_client"),
        (lambda: pathological(LABELS, 10, 11, 0), "classes_per_client"),
        (lambda: pathological(LABELS, 400, 2, 0), "classes_per_client"),
        (lambda: by_group(np.arange(4) % 2, 3), "n_clients"),
        (lambda: partition("shuffled", n_clients=2, n_samples=10), "kind"),
        (lambda: partition("dirichlet", n_clients=2), "labels"),
        (lambda: partition("by_role", n_clients=2, labels=LABELS), "groups"),
        (lambda: partition("iid", n_clients=2), "n_samples"),
        (lambda: partition("iid", n_samples=10), "n_clients"),
        (lambda: partition("dirichlet", n_clients=2, labels=LABELS, alpha=0), "alpha"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(call, named: str) -> None:
    with pytest.raises(ValueError, match=named):
        call()


def test_dispatcher_matches_the_partitioners() -> None:
    y, groups = skewed_labels(), np.arange(1000) // 100
    same = [
        (partition("iid", n_clients=4, labels=y, seed=3), iid(1000, 4, 3)),
        (partition("dirichlet", n_clients=4, labels=y, alpha=0.2, seed=3), dirichlet(y, 4, 0.2, 3)),
        (partition("pathological", n_clients=4, labels=y, classes_per_client=3, seed=3), pathological(y, 4, 3, 3)),
        (partition("by_play", groups=groups), by_group(groups)),
        (partition("by_role", n_clients=3, groups=groups), by_group(groups, 3)),
    ]
    for got, want in same:
        assert len(got) == len(want) and all(np.array_equal(a, b) for a, b in zip(got, want, strict=True))
