"""Where the coordinator's memory peaks: one process, the coordinator's own code, phase by phase.

The same model and codec as bench/coordinator_scale.py (a 10.75M-parameter GPT, SparseLoCo's paper codec) at
`--workers` workers (default 10), without gRPC's threads: the initial state and every update go through the
wire encoding (`serde.push_stream` -> `serde.read_push`, what `PushUpdate` runs) and then the state machine
(`CoordinatorState.offer_initial_state` / `submit`), each round's aggregate is encoded and serialized once, as its
pulls would be, and each closed round's checkpoint is written to a run directory, synchronously here (the
recording thread does it concurrently in a server).

Peak RSS is measured per call of the coordinator's functions: each wrapped call resets the kernel's peak
(`/proc/self/clear_refs` 5) on entry and reads VmHWM on exit, folding the peak into the enclosing call's,
so every row's `peak_over_entry` is the most that call added on top of what was resident when it started.
Rows also give the live bytes of torch tensors and numpy arrays after the call (a gc walk, each storage
counted once): what RSS holds beyond them is the allocator's (freed, not returned to the system).
The result also counts the wire bytes both ways, per worker over the run, from the workers' side:
`bytes_sent_per_worker` (its updates, plus the initial state shared out over the workers; `state_sent_bytes`
alone), `bytes_received_per_worker` (the aggregates it pulls) and `bytes_total_per_worker`.

The client side (the initial parameters, the two updates of bench/coordinator_scale.py's two client processes)
is built by a separate process, which serializes their streams to files read back here message by message, so
none of its memory is counted. `--no-malloc-tuning` leaves glibc's malloc as it comes (CoordinatorServer tunes
it, and so does this by default: coordinator/malloc.py); `--trim` calls malloc_trim after every round.

    python -m bench.coordinator_memory --workers 10 --rounds 3
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import subprocess
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import command_line, write_result
from bench.coordinator_scale import FULL_MODEL, bench_config
from bench.proc_memory import proc_status
from bench.scale_procs import initial_params, one_update
from compression.payload import dense
from protocols.config import PROTOCOL_VERSION, parse_config
from protocols.wire import lowband_pb2 as pb
from protocols.wire import messages as m
from protocols.wire import serde

COLUMNS = ["phase", "calls", "entry_rss_mb", "peak_mb", "peak_over_entry_mb", "peak_over_model", "exit_rss_mb",
           "live_tensor_mb"]
MB = 1e6


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def live_array_bytes() -> int:
    """Bytes of every live torch tensor's and numpy array's storage, each storage once."""
    seen: dict[int, int] = {}
    with warnings.catch_warnings():  # isinstance on torch's deprecated module attributes warns
        warnings.simplefilter("ignore")
        objects = [o for o in gc.get_objects() if isinstance(o, torch.Tensor | np.ndarray)]
    for obj in objects:
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
        elif isinstance(obj, np.ndarray) and obj.base is None:
            seen[obj.ctypes.data] = max(seen.get(obj.ctypes.data, 0), obj.nbytes)
    return sum(seen.values())


class PeakProfiler:
    """Per wrapped call: resident set on entry, peak during it (nested calls' peaks included), on exit."""

    def __init__(self, account: bool) -> None:
        self.account = account
        self.stack: list[int] = []
        self.calls: dict[str, list[dict[str, float]]] = defaultdict(list)
        self.order: list[str] = []

    @contextmanager
    def phase(self, key: str) -> Iterator[None]:
        now = proc_status()
        if self.stack:  # the enclosing call's peak so far, before this one resets the counter
            self.stack[-1] = max(self.stack[-1], now["VmHWM"])
        _reset_peak()
        self.stack.append(now["VmRSS"])
        entry = now["VmRSS"]
        t0 = time.perf_counter()
        try:
            yield
        finally:
            seconds = time.perf_counter() - t0
            end = proc_status()
            peak = max(self.stack.pop(), end["VmHWM"])
            if self.stack:
                self.stack[-1] = max(self.stack[-1], peak)
            row = {"entry": entry, "peak": peak, "exit": end["VmRSS"], "seconds": seconds}
            if self.account:
                row["live"] = live_array_bytes()
            if key not in self.calls:
                self.order.append(key)
            self.calls[key].append(row)

    def wrap(self, owner: Any, method: str, key: str) -> None:
        original = getattr(owner, method)

        def measured(*args: Any, **kwargs: Any) -> Any:
            with self.phase(key):
                return original(*args, **kwargs)

        setattr(owner, method, measured)

    def rows(self, model_bytes: int) -> list[dict[str, Any]]:
        out = []
        for key in self.order:
            calls = self.calls[key]
            worst = max(calls, key=lambda c: c["peak"] - c["entry"])
            out.append({"phase": key, "calls": len(calls), "entry_rss_mb": worst["entry"] / MB,
                        "peak_mb": max(c["peak"] for c in calls) / MB,
                        "peak_over_entry_mb": (worst["peak"] - worst["entry"]) / MB,
                        "peak_over_model": (worst["peak"] - worst["entry"]) / model_bytes,
                        "exit_rss_mb": worst["exit"] / MB,
                        "live_tensor_mb": worst["live"] / MB if "live" in worst else None,
                        "seconds": sum(c["seconds"] for c in calls)})
        return out


def instrument(profiler: PeakProfiler) -> None:
    import coordinator.pushes
    import coordinator.state
    import protocols.round
    from coordinator.rundir import RunDir
    from protocols.compressed import AveragingProtocol
    from protocols.downlink import Downlink
    from protocols.replica import Replica
    from protocols.round import RoundAggregator

    profiler.wrap(coordinator.state, "check_initial_state", "initial: decode and check")
    profiler.wrap(coordinator.pushes, "check_update", "push: check_update")
    profiler.wrap(RoundAggregator, "__init__", "initial: RoundAggregator")
    profiler.wrap(RoundAggregator, "fold", "push: fold")
    profiler.wrap(RoundAggregator, "close", "close: RoundAggregator.close")
    profiler.wrap(AveragingProtocol, "close", "close: protocol.close (mean)")
    profiler.wrap(Downlink, "encode", "close: downlink.encode")
    profiler.wrap(protocols.round, "apply_aggregate", "close: apply_aggregate")
    profiler.wrap(Replica, "digest", "digest")
    profiler.wrap(RunDir, "save_checkpoint", "checkpoint: save")


def _record_now(run: Any, closed: Any) -> None:
    """The recorder's work, on the calling thread: the round written, then its replica's loan given back."""
    try:
        run._record(closed)
    finally:
        closed.release()


def _write_stream(messages: Iterator[Any], path: Path) -> None:
    with path.open("wb") as f:
        for msg in messages:
            data = msg.SerializeToString()
            f.write(len(data).to_bytes(8, "little") + data)


def _frames(path: Path) -> Iterator[bytes]:
    """The serialized messages of a stream `_write_stream` wrote, without the framing."""
    with path.open("rb") as f:
        while size := f.read(8):
            yield f.read(int.from_bytes(size, "little"))


def _stream_bytes(path: Path) -> int:
    """The wire bytes of a stream `_write_stream` wrote: its messages, serialized."""
    return sum(len(data) for data in _frames(path))


def _read_stream(path: Path) -> Iterator[pb.PushMessage]:
    return (pb.PushMessage.FromString(data) for data in _frames(path))


def prepare(workers: int, rounds: int, work: Path) -> None:
    """The client side, in its own process (so none of its memory is the coordinator's): the initial state's
    PushUpdate stream and the two updates' streams (as bench/coordinator_scale.py's two client processes push),
    serialized message by message into `work`, for the coordinator's side to read back as gRPC hands them over."""
    cfg = parse_config(bench_config(workers, rounds, FULL_MODEL))
    params = initial_params(cfg)
    header = m.PushHeader(envelope=m.Envelope("", "w0", 0, PROTOCOL_VERSION, ""), kind=m.PushKind.INITIAL_STATE,
                          weight=1.0, num_entries=len(params),
                          total_bytes=sum(t.numel() * t.element_size() for t in params.values()))
    _write_stream(serde.push_stream(header, {n: dense(t) for n, t in params.items()}), work / "initial.bin")
    for k in range(2):
        update = one_update(cfg, params, seed=1 + k)
        header = m.PushHeader(envelope=m.Envelope("", "", 0, PROTOCOL_VERSION, ""), kind=m.PushKind.UPDATE,
                              weight=update.weight, num_entries=len(update.payloads),
                              total_bytes=sum(p.nbytes() for p in update.payloads.values()))
        _write_stream(serde.push_stream(header, update.payloads), work / f"update{k}.bin")
    (work / "model_bytes").write_text(str(sum(t.numel() * 4 for t in params.values())))


def run(workers: int, rounds: int, account: bool, trim: bool, malloc: bool) -> dict[str, Any]:
    cfg = parse_config(bench_config(workers, rounds, FULL_MODEL))
    with tempfile.TemporaryDirectory(prefix="lowband-memory-") as work:
        return _measure(Path(work), cfg, workers, rounds, account, trim, malloc)


def _measure(tmp: Path, cfg: Any, workers: int, rounds: int, account: bool, trim: bool, malloc: bool
             ) -> dict[str, Any]:
    from coordinator.malloc import tune_malloc
    from coordinator.run import CoordinatorRun
    from coordinator.servicer import EncodedAggregates
    from protocols.base import Update

    subprocess.run([sys.executable, "-m", "bench.coordinator_memory", "--prepare", str(tmp), "--workers",
                    str(workers), "--rounds", str(rounds)], check=True)
    model_bytes = int((tmp / "model_bytes").read_text())
    if malloc:
        tune_malloc()  # as CoordinatorServer does (coordinator/malloc.py)
    run = CoordinatorRun(cfg, run_dir=tmp / "run")
    run.recorder.put = partial(_record_now, run)  # type: ignore[method-assign]  # synchronous: measured alone
    aggregates = EncodedAggregates(m.DEFAULT_CHUNK_BYTES)
    profiler = PeakProfiler(account)
    instrument(profiler)
    libc = ctypes.CDLL("libc.so.6") if trim else None
    gc.collect()
    baseline = proc_status()["VmRSS"]
    _reset_peak()
    state = run.state
    members = [state.join_session(f"h{i}", "", PROTOCOL_VERSION)[0] for i in range(workers)]
    # Bytes both ways, from the workers' side: what they push (the initial state once, an update a round each)
    # and what they pull (the aggregate a round each), as serialized messages on the wire.
    state_sent = _stream_bytes(tmp / "initial.bin")
    update_bytes = [_stream_bytes(tmp / f"update{k}.bin") for k in range(2)]  # the two distinct updates
    protocol_sent = rounds * sum(update_bytes[i * 2 // workers] for i in range(workers))
    received = 0
    with profiler.phase("initial: whole upload"):
        with profiler.phase("initial: read_push"):
            _, entries = serde.read_push(_read_stream(tmp / "initial.bin"), state.max_push_bytes)
        with profiler.phase("initial: offer_initial_state"):
            state.offer_initial_state(members[0].worker_id, "", entries, 0, owned=True)  # as PushUpdate does
        del entries
    for r in range(rounds):
        with profiler.phase("round: all pushes and the close"):
            for i, member in enumerate(members):
                # As the servicer has it: read off the wire (fresh tensors per push), from one of the two updates.
                header, payloads = serde.read_push(_read_stream(tmp / f"update{i * 2 // workers}.bin"), 1 << 40)
                update = Update(payloads=payloads, weight=header.weight, base="")
                with profiler.phase("push: submit (decode, check, fold; the last closes)"):
                    state.submit(member.worker_id, "", r, update, {"tokens": 0.0}, 0)
                del update
        aggregate, digest_after = state.aggregates[r]
        with profiler.phase("pulls: encode once, stream per pull"):
            for _ in members:  # serialized once: a pull only names the shared bytes (gRPC's core copies them)
                received += sum(len(message) for message in aggregates.of(aggregate).stream(digest_after))
        if libc is not None:
            libc.malloc_trim(0)
    status = proc_status()
    rows = profiler.rows(model_bytes)
    peak = max(c["peak"] for calls in profiler.calls.values() for c in calls)
    return {"rows": rows, "baseline_rss_bytes": baseline, "peak_rss_bytes": peak, "model_fp32_bytes": model_bytes,
            "rss_over_model": peak / model_bytes, "rss_growth_over_model": (peak - baseline) / model_bytes,
            "final_rss_bytes": status["VmRSS"], "final_live_bytes": live_array_bytes(),
            "bytes_sent_per_worker": (state_sent + protocol_sent) / workers,
            "bytes_received_per_worker": received / workers,
            "bytes_total_per_worker": (state_sent + protocol_sent + received) / workers,
            "protocol_sent_per_worker": protocol_sent / workers, "state_sent_bytes": state_sent,
            "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-account", action="store_true", help="skip the gc walk of live tensors after each call")
    parser.add_argument("--no-malloc-tuning", action="store_true",
                        help="leave glibc's malloc as it is (CoordinatorServer tunes it: coordinator/malloc.py)")
    parser.add_argument("--trim", action="store_true", help="malloc_trim(0) after each round's pulls")
    parser.add_argument("--prepare", type=Path, help=argparse.SUPPRESS)  # the client side's process
    parser.add_argument("--out", default="coordinator_memory", help="result name in bench/results")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.prepare is not None:
        prepare(args.workers, args.rounds, args.prepare)
        return
    result = run(args.workers, args.rounds, not args.no_account, args.trim, not args.no_malloc_tuning)
    rows = result.pop("rows")
    write_result(args.out, command_line("bench.coordinator_memory"), rows, COLUMNS,
                 config={"workers": args.workers, "rounds": args.rounds, "model": FULL_MODEL, "trim": args.trim,
                         "malloc_tuning": not args.no_malloc_tuning},
                 **result)
    print({k: v for k, v in result.items()})


if __name__ == "__main__":
    main()
