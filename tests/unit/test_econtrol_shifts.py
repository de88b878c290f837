"""EControl's aggregator keeps every worker's shift h_i and steps with their mean, so a worker that
misses rounds leaves no bias (Gao, Islamov, Stich, arXiv:2311.05645; `protocols.compressed.WorkerShifts`).

Four workers run their real `ErrorFeedback` state through `make_update` against a `RoundAggregator`
for five rounds (0-based rounds 0..4). Worker w3 misses rounds 2 and 3 (0-based; the third and fourth
rounds) the way the worker loop handles a refused update: nothing is submitted and its error-feedback
state is rolled back to before `make_update`. After every round the aggregator's copy of each h_i is
that worker's own shift, and the update applied is the mean over all four shifts. The receiver the
protocol used before (`Mirror`: h_bar += mean of the senders' messages) is run alongside to show that
it drifts away from that mean as soon as a worker is missing, which is what this test guards against.
"""

from __future__ import annotations

import copy

import torch

from compression import registry
from compression.error_feedback import ErrorFeedback, Mirror
from protocols.base import Update
from protocols.compressed import WorkerShifts
from protocols.econtrol import EControl
from protocols.replica import Params
from tests.unit.protocol_helpers import dense_aggregator, locals_from, rand

WORKERS = ("w0", "w1", "w2", "w3")
ROUNDS = 5
ABSENT = {2: {"w3"}, 3: {"w3"}}  # 0-based round -> workers whose update never arrives
START: Params = {"w": rand(0, (24, 40)), "b": rand(1, (40,))}


def _deltas(worker: int, round_: int) -> Params:
    # Heterogeneous workers: each has its own fixed direction (what keeps the shifts apart) plus noise.
    out = {}
    for i, (name, t) in enumerate(START.items()):
        shape = tuple(t.shape)
        out[name] = rand(1000 + 10 * worker + i, shape, 0.05) + rand(100 * round_ + 10 * worker + i, shape, 0.01)
    return out


def _mean_shift(states: dict[str, ErrorFeedback], name: str) -> torch.Tensor:
    shifts = [states[w].shift(name) for w in WORKERS]
    assert all(s is not None for s in shifts)
    return torch.stack([s for s in shifts if s is not None]).mean(0)


def test_econtrol_aggregator_mirrors_every_workers_shift_when_one_misses_rounds() -> None:
    protocol = EControl()  # the paper's: top-10% per chunk, eta = the codec's delta (0.1)
    assert protocol.compression.keeps_shift and protocol.compression.eta == 0.1
    aggregator = dense_aggregator(protocol, START)  # the paper broadcasts the (dense) mean of the shifts
    states: dict[str, ErrorFeedback] = {}
    for w in WORKERS:
        state = protocol.init_worker_state(START)
        assert isinstance(state, ErrorFeedback)
        states[w] = state
    old_receiver = Mirror("econtrol")  # the previous coordinator: h_bar += mean of the senders' messages
    biased_gap = 0.0
    for r in range(ROUNDS):
        before = aggregator.replica
        sent: dict[str, Update] = {}
        for k, w in enumerate(WORKERS):
            kept = copy.deepcopy(states[w])  # what the worker loop keeps in case the update is refused
            update, state = protocol.make_update(locals_from(before.params, _deltas(k, r)), before.params, states[w])
            assert isinstance(state, ErrorFeedback)
            if w in ABSENT.get(r, set()):
                states[w] = kept  # never arrived: the worker's state is as if it had not made the update
                continue
            states[w] = state
            sent[w] = update
            aggregator.submit(w, update)
        assert aggregator.senders == list(sent)
        aggregate = aggregator.close()
        server = aggregator.state
        assert isinstance(server, WorkerShifts) and sorted(server.shifts) == list(WORKERS)
        for name in START:
            for w in WORKERS:  # w3's copy stayed put while it was away, as its own shift did
                own = states[w].shift(name)
                assert own is not None
                torch.testing.assert_close(server.shifts[w][name], own, rtol=1e-6, atol=1e-7)
            mean_shift = _mean_shift(states, name)
            applied = registry.decode(aggregate.payloads[name])  # dense downlink: exactly `close`'s update
            torch.testing.assert_close(applied, mean_shift, rtol=1e-6, atol=1e-7)
            # outer SGD lr 1, no momentum: the replica moved by exactly the applied update
            assert torch.equal(aggregator.replica.params[name], before.params[name] - applied)
            senders_mean = torch.stack([registry.decode(u.payloads[name]) for u in sent.values()]).mean(0)
            old = old_receiver.update(name, senders_mean)
            if r < 2:  # everybody sent every round so far: the old receiver agreed
                torch.testing.assert_close(old, mean_shift, rtol=1e-5, atol=1e-6)
            if r == 3:
                biased_gap = max(biased_gap, float((old - mean_shift).abs().max() / mean_shift.abs().max()))
    # In round 3 (w3 away for the second time) h_bar + mean(senders' messages) is far from the mean of
    # the shifts: the old rule would have failed the assertions above.
    assert biased_gap > 0.05, biased_gap
