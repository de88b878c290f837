"""CPU cost of one round's protocol work, SparseLoCo against dense DiLoCo, on bench.overlap's model.

    python -m bench.sparseloco_codec [--rounds 20] [--model small] [--out sparseloco_codec]

bench.overlap's 4 workers and coordinator share 2 cores with the training, so every ms of CPU a round
spends outside the inner steps is taken from them. This times, in one process with one torch thread, the
pure protocol code of one round of `bench.overlap`'s contenders on its 108k-parameter GPT (20 tensors),
4 workers, with random pseudo-gradients (`--model wide`: bench.overlap's wide model, 0.8M parameters, 36 tensors):

- make_update: one worker's update (pseudo-gradient, error feedback, codec), per worker;
- submit:      the aggregator checking and folding one update (`RoundAggregator.submit`), per update;
- close:       the aggregator closing the round (mean, downlink encode, applying it to its own replica);
- apply:       one worker applying the round's aggregate (`apply_aggregate`: for SparseLoCo's relayed
               downlink, checking and folding every update again), per worker.

`round_cpu_ms` = 4 make_update + 4 submit + close + 4 apply: the CPU all processes spend on one round,
and `vs_diloco` its ratio to dense synchronous DiLoCo's. Times are CPU seconds of this process
(`time.process_time`, less moved by other jobs on the machine than wall time), the median over
`--rounds` rounds after 3 warm-up rounds. The `-per-tensor` row makes SparseLoCo's updates tensor by
tensor (`ErrorFeedback.step` per name, what make_update did before `step_all`), the rest as its twin.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from bench.common import command_line, write_result
from bench.overlap_runs import DEFAULT_MODEL, MODELS, WORKERS, run_config
from compression.error_feedback import ErrorFeedback
from protocols.base import Update
from protocols.downlink import Downlink, apply_aggregate
from protocols.registry import build_protocol
from protocols.replica import Params, Replica
from protocols.round import RoundAggregator
from worker.session import Session

COLUMNS = ["contender", "make_update_ms", "submit_ms", "close_ms", "apply_ms", "round_cpu_ms", "vs_diloco"]
CONTENDERS = ("diloco-sync", "diloco-co2", "sparseloco-sync", "sparseloco-co2", "sparseloco-co2-per-tensor")
PHASES = ("make_update", "submit", "close", "apply")


def per_tensor(protocol: Any) -> Callable[[Params, Params, Any], tuple[Update, Any]]:
    """make_update as it was before ErrorFeedback.step_all: every tensor through `step` on its own."""
    def make_update(local: Params, replica: Params, state: Any) -> tuple[Update, Any]:
        assert isinstance(state, ErrorFeedback)
        deltas = {n: replica[n] - t for n, t in local.items()}
        return Update(payloads={n: state.step(n, d) for n, d in deltas.items()}), state
    return make_update


def measure(contender: str, params: Params, rounds: int, model: str = DEFAULT_MODEL) -> dict[str, Any]:
    cfg = run_config(contender.removesuffix("-per-tensor"), 32, inner_steps=32, model=model)
    protocol = build_protocol(cfg)
    downlink = Downlink.of(cfg.protocol, protocol)
    make = per_tensor(protocol) if contender.endswith("-per-tensor") else protocol.make_update
    aggregator = RoundAggregator(protocol, downlink, Replica(round=0, params=params))
    replica = Replica(round=0, params=params)
    states = [protocol.init_worker_state(params) for _ in range(WORKERS)]
    gen = torch.Generator().manual_seed(0)
    times: dict[str, list[float]] = {phase: [] for phase in PHASES}

    def timed(phase: str, fn: Callable[[], Any]) -> Any:
        began = time.process_time()
        out = fn()
        times[phase].append(time.process_time() - began)
        return out

    for _ in range(rounds + 3):
        updates = []
        for w in range(WORKERS):
            local = {n: p - 0.01 * torch.randn(p.shape, generator=gen) for n, p in replica.params.items()}
            update, states[w] = timed("make_update", lambda: make(local, replica.params, states[w]))  # noqa: B023
            updates.append(update)
        for w, update in enumerate(updates):
            timed("submit", lambda: aggregator.submit(f"w{w}", update, w))  # noqa: B023
        aggregate = timed("close", aggregator.close)
        for _ in range(WORKERS):  # every worker applies the same aggregate to the same replica
            after = timed("apply", lambda: apply_aggregate(protocol, downlink, aggregate, replica))  # noqa: B023
        replica = after
    skip = {"make_update": 3 * WORKERS, "submit": 3 * WORKERS, "close": 3, "apply": 3 * WORKERS}
    row: dict[str, Any] = {"contender": contender}
    for phase in PHASES:
        row[f"{phase}_ms"] = 1e3 * statistics.median(times[phase][skip[phase]:])
    row["round_cpu_ms"] = WORKERS * (row["make_update_ms"] + row["submit_ms"] + row["apply_ms"]) + row["close_ms"]
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20, help="timed rounds per contender (median reported)")
    parser.add_argument("--model", choices=sorted(MODELS), default=DEFAULT_MODEL,
                        help=f"bench.overlap's model to time (default {DEFAULT_MODEL})")
    parser.add_argument("--out", default="sparseloco_codec", help="bench/results/<out>.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    session = Session.build(run_config("diloco-sync", 32, inner_steps=32, model=args.model), 0, WORKERS,
                            evaluates=False)
    params = {n: p.detach().clone() for n, p in session.params().items()}
    rows = [measure(contender, params, args.rounds, args.model) for contender in CONTENDERS]
    base = rows[0]["round_cpu_ms"]
    for row in rows:
        row["vs_diloco"] = row["round_cpu_ms"] / base
    write_result(args.out, command_line("bench.sparseloco_codec"), rows, COLUMNS, threads=1,
                 tensors=len(params), parameters=sum(p.numel() for p in params.values()), model=args.model)


if __name__ == "__main__":
    main()
