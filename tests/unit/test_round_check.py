"""A round judges every update before folding any of it (`protocols/round.py` + `protocols/check.py`).

For each way an update can be wrong, `RoundAggregator.submit` raises `UpdateRejected` whose message
names the problem, and the open round is exactly as before: the accumulator's tensors and counters are
bit-for-bit unchanged and the next valid update folds as if the bad one never came (the round then
closes to exactly what a round that only ever saw the valid updates closes to).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest
import torch

from compression import registry
from compression.payload import Payload, dense
from protocols.base import Update
from protocols.compressed import Compression
from protocols.diloco import DiLoCo
from protocols.downlink import Downlink
from protocols.econtrol import EControl
from protocols.replica import Params, Replica
from protocols.round import RoundAggregator, UpdateRejected
from protocols.sparseloco import SparseLoCo, SparseMeanAccumulator
from tests.unit.protocol_helpers import (
    AnyProtocol,
    assert_replicas_equal,
    assert_same_state,
    dense_aggregator,
    rand,
    tensor_state,
)

SHAPES = {"a": (4, 8), "b": (16,)}
START: Params = {name: rand(i, shape) for i, (name, shape) in enumerate(SHAPES.items())}

# Three real runs: dense DiLoCo (a dense running mean), SparseLoCo on chunked top-k and on global
# top-k (per-coordinate sums and sender weights).
RUNS: dict[str, Callable[[], AnyProtocol]] = {
    "diloco-dense": DiLoCo,
    "sparseloco-topk": lambda: SparseLoCo(
        compression=Compression(codec="topk", error_feedback="ef14", params={"density": 0.25, "chunk": 8})
    ),
    "sparseloco-topk_global": lambda: SparseLoCo(
        compression=Compression(codec="topk_global", error_feedback="ef14", params={"density": 0.25})
    ),
}


def _encode(protocol: AnyProtocol, tensor: torch.Tensor, name: str) -> Payload:
    """`tensor` in the run's uplink codec (as a worker without error feedback would send it)."""
    return protocol.compression.new_feedback().compressor.compress(tensor, key=name)  # type: ignore[attr-defined]


def _valid(protocol: AnyProtocol, seed: int, weight: float = 1.0) -> Update:
    payloads = {n: _encode(protocol, rand(seed * 10 + i, s), n) for i, (n, s) in enumerate(SHAPES.items())}
    return Update(payloads, weight)


def _with(update: Update, name: str, **changes: object) -> Update:
    """`update` with the payload of `name` changed (payloads are frozen: a modified copy)."""
    return Update({**update.payloads, name: dataclasses.replace(update.payloads[name], **changes)}, update.weight)


def _with_values(update: Update, name: str, value: float) -> Update:
    values = update.payloads[name].tensors["values"].clone()
    values.view(-1)[0] = value
    return _with(update, name, tensors={**update.payloads[name].tensors, "values": values})


def _oversized(update: Update) -> Update:
    padding = torch.zeros(4 * sum(t.numel() * t.element_size() for t in START.values()) + 8192, dtype=torch.uint8)
    return _with(update, "a", tensors={**update.payloads["a"].tensors, "padding": padding})


BAD: dict[str, tuple[Callable[[AnyProtocol], Update], str]] = {
    "nan": (lambda p: _with_values(_valid(p, 5), "b", float("nan")), r"tensor 'b' contains NaN or Inf"),
    "inf": (lambda p: _with_values(_valid(p, 5), "b", float("inf")), r"tensor 'b' contains NaN or Inf"),
    "wrong shape": (lambda p: _with(_valid(p, 5), "a", shape=(8, 4)), r"'a' has shape \[8, 4\], expected \[4, 8\]"),
    "wrong dtype": (
        lambda p: Update({**_valid(p, 5).payloads, "b": _encode(p, rand(9, SHAPES["b"], dtype=torch.float64), "b")}),
        r"'b' has dtype torch.float64, expected one of \['torch.float32'\]",
    ),
    "missing tensor": (lambda p: Update({"a": _valid(p, 5).payloads["a"]}), r"lacks tensor\(s\) \['b'\]"),
    "extra tensor": (
        lambda p: Update({**_valid(p, 5).payloads, "c": _encode(p, rand(9, (3,)), "c")}),
        r"unknown tensor name\(s\) \['c'\]",
    ),
    "zero weight": (lambda p: _valid(p, 5, weight=0.0), r"weight must be finite and > 0, got 0.0"),
    "negative weight": (lambda p: _valid(p, 5, weight=-1.0), r"weight must be finite and > 0, got -1.0"),
    "nan weight": (lambda p: _valid(p, 5, weight=float("nan")), r"weight must be finite and > 0, got nan"),
    "oversized": (lambda p: _oversized(_valid(p, 5)), r"update of \d+ bytes exceeds the limit of \d+"),
    "other codec": (
        lambda p: Update({n: registry.build("int4").compress(t) for n, t in START.items()}),
        r"tensor 'a' is encoded with codec 'int4', this run's uplink codec is",
    ),
}


def _assert_refused_and_nothing_folded(aggregator: RoundAggregator, worker: str, bad: Update, message: str) -> None:
    before = tensor_state(aggregator.acc)
    senders, count = list(aggregator.senders), aggregator.acc.count
    with pytest.raises(UpdateRejected, match=message) as refused:
        aggregator.submit(worker, bad)
    assert f"worker {worker}" in str(refused.value)
    assert_same_state(before, tensor_state(aggregator.acc))
    assert aggregator.senders == senders and aggregator.acc.count == count


def _assert_round_closes_as_if_only_valid_updates_came(
    make: Callable[[], AnyProtocol], aggregator: RoundAggregator, valid: dict[str, Update]
) -> None:
    clean = dense_aggregator(make(), START)
    for worker, update in valid.items():
        clean.submit(worker, update)
    assert aggregator.senders == clean.senders and aggregator.acc.count == clean.acc.count
    assert_same_state(tensor_state(clean.acc), tensor_state(aggregator.acc))
    aggregator.close()
    clean.close()
    assert_replicas_equal(aggregator.replica, clean.replica)


@pytest.mark.parametrize("run", sorted(RUNS))
@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_update_is_refused_whole_and_the_next_valid_one_folds(run: str, case: str) -> None:
    make, (build_bad, message) = RUNS[run], BAD[case]
    aggregator = dense_aggregator(make(), START)
    first, later = _valid(aggregator.protocol, 1), _valid(aggregator.protocol, 2, weight=2.0)
    aggregator.submit("w0", first)  # a round already under way: the sums are not trivially zero
    _assert_refused_and_nothing_folded(aggregator, "w1", build_bad(aggregator.protocol), message)
    aggregator.submit("w1", later)  # the refused worker may still send a valid update
    _assert_round_closes_as_if_only_valid_updates_came(make, aggregator, {"w0": first, "w1": later})


def test_a_push_mixing_codecs_folds_not_even_its_valid_first_tensor() -> None:
    make = RUNS["sparseloco-topk"]
    aggregator = dense_aggregator(make(), START)
    first = _valid(aggregator.protocol, 1)
    aggregator.submit("w0", first)
    valid_topk = _valid(aggregator.protocol, 3).payloads["a"]
    mixed = Update({"a": valid_topk, "b": registry.build("int8").compress(START["b"])})
    assert list(mixed.payloads) == ["a", "b"]  # the valid topk tensor is checked first
    _assert_refused_and_nothing_folded(
        aggregator, "w1", mixed, r"tensor 'b' is encoded with codec 'int8', this run's uplink codec is 'topk'"
    )
    _assert_round_closes_as_if_only_valid_updates_came(make, aggregator, {"w0": first})


def _topk_global(indices: list[int], values: list[float], shape: tuple[int, ...]) -> Payload:
    """A hand-built global top-k payload (the codec itself never repeats an index)."""
    return Payload(
        "topk_global", shape, torch.float32,
        tensors={"indices": torch.tensor(indices, dtype=torch.int32), "values": torch.tensor(values)},
        meta={"k": len(indices), "value_dtype": "float32"},
    )


@pytest.mark.parametrize(
    ("indices", "message"),
    [
        ([3, 7, 3], r"tensor 'b' repeats indices"),
        ([3, 16], r"tensor 'b': topk_global payload index out of range"),
        ([-1, 3], r"tensor 'b': topk_global payload index out of range"),
    ],
)
def test_sparse_indices_repeated_or_out_of_range_are_refused(indices: list[int], message: str) -> None:
    make = RUNS["sparseloco-topk_global"]
    aggregator = dense_aggregator(make(), START)
    first = _valid(aggregator.protocol, 1)
    aggregator.submit("w0", first)
    values = [float(i + 1) for i in range(len(indices))]
    bad = Update({"a": first.payloads["a"], "b": _topk_global(indices, values, SHAPES["b"])})
    _assert_refused_and_nothing_folded(aggregator, "w1", bad, message)
    _assert_round_closes_as_if_only_valid_updates_came(make, aggregator, {"w0": first})


@pytest.mark.parametrize("run", sorted(RUNS))
def test_a_second_update_from_the_same_worker_is_a_duplicate(run: str) -> None:
    make = RUNS[run]
    aggregator = dense_aggregator(make(), START)
    first = _valid(aggregator.protocol, 1)
    aggregator.submit("w0", first)
    before = tensor_state(aggregator.acc)
    with pytest.raises(UpdateRejected, match="worker w0 already sent its update for round 0") as refused:
        aggregator.submit("w0", _valid(aggregator.protocol, 2))
    assert refused.value.duplicate is True
    assert_same_state(before, tensor_state(aggregator.acc))
    _assert_round_closes_as_if_only_valid_updates_came(make, aggregator, {"w0": first})


def test_only_a_duplicate_is_marked_duplicate() -> None:
    aggregator = dense_aggregator(DiLoCo(), START)
    with pytest.raises(UpdateRejected) as refused:
        aggregator.submit("w0", _valid(aggregator.protocol, 1, weight=0.0))
    assert refused.value.duplicate is False


def test_a_valid_sparse_update_folds_exactly_its_coordinates() -> None:
    aggregator = dense_aggregator(RUNS["sparseloco-topk_global"](), START)
    sent = {1: 0.5, 5: -2.0, 14: 3.0}
    update = Update(
        {"a": _topk_global([0], [1.0], SHAPES["a"]), "b": _topk_global(list(sent), list(sent.values()), SHAPES["b"])},
        weight=2.0,
    )
    aggregator.submit("w0", update)
    acc = aggregator.acc
    assert isinstance(acc, SparseMeanAccumulator) and acc.count == 1 and acc.total_weight == 2.0
    expected_sums, expected_weights = torch.zeros(16), torch.zeros(16)
    for i, v in sent.items():
        expected_sums[i], expected_weights[i] = 2.0 * v, 2.0
    assert torch.equal(acc.sums["b"], expected_sums) and torch.equal(acc.weights["b"], expected_weights)
    assert torch.equal(acc.weights["a"].nonzero().view(-1), torch.tensor([0]))
    mean = acc.mean()["b"]
    assert torch.equal(mean.nonzero().view(-1), torch.tensor(sorted(sent)))  # nothing else moves
    assert [float(mean[i]) for i in sorted(sent)] == [sent[i] for i in sorted(sent)]


# ---- error feedback sends bf16 tensors' updates as float32; a failed close changes nothing ----

MADE_BY_THE_PROTOCOL: dict[str, Callable[[], AnyProtocol]] = {
    "diloco-dense": DiLoCo,
    "diloco-int8-ef14": lambda: DiLoCo(compression=Compression(codec="int8", error_feedback="ef14")),
    "sparseloco-paper": SparseLoCo,
    "econtrol-paper": EControl,
}


def _made_params() -> list[object]:
    out: list[object] = []
    for run in sorted(MADE_BY_THE_PROTOCOL):
        for dtype in (torch.float32, torch.float64, torch.bfloat16):
            out.append(pytest.param(run, dtype, id=f"{run}-{str(dtype).removeprefix('torch.')}"))
    return out


@pytest.mark.parametrize(("run", "dtype"), _made_params())
def test_every_update_the_protocol_makes_from_the_replica_passes_the_check(run: str, dtype: torch.dtype) -> None:
    start = {name: t.to(dtype) for name, t in START.items()}
    protocol = MADE_BY_THE_PROTOCOL[run]()
    aggregator = dense_aggregator(protocol, start)
    state = protocol.init_worker_state(start)
    update, _ = protocol.make_update({n: t - 0.01 for n, t in start.items()}, start, state)
    aggregator.submit("w0", update)
    aggregator.close()
    assert aggregator.round == 1 and all(t.dtype == dtype for t in aggregator.replica.params.values())


@pytest.mark.parametrize("feedback", ["none", "ef21"])
def test_a_close_that_fails_leaves_the_round_as_it_was(feedback: str) -> None:
    # Every update is finite, but their float32 sum overflows: the aggregate is Inf and is refused.
    protocol = DiLoCo(outer_lr=1.0, outer_momentum=0.0, compression=Compression(error_feedback=feedback))
    aggregator = RoundAggregator(protocol, Downlink("dense"), Replica(0, {"x": torch.zeros(2)}), fold_in_order=True)
    aggregator.bound_updates(float("inf"))  # the magnitude bound would refuse 3e38 before any fold
    huge = Update({"x": dense(torch.full((2,), 3e38))})
    aggregator.submit("a", huge)
    aggregator.submit("b", huge)
    state, acc = tensor_state(aggregator.state), tensor_state(aggregator.acc)
    for _ in range(2):  # the coordinator retries closing on its next event
        with pytest.raises(ValueError, match="contains NaN or Inf"):
            aggregator.close()
        assert aggregator.round == 0 and aggregator.senders == ["a", "b"]
        assert_same_state(state, tensor_state(aggregator.state))  # ef21: the shifts moved on
        assert_same_state(acc, tensor_state(aggregator.acc))  # none: a retry folds a and b again
