"""The processes of bench/coordinator_scale.py, each its own interpreter (so the coordinator's memory is its own):

- `coordinator SPEC`: a `CoordinatorServer` with a run directory (a checkpoint and a metrics row per round, as
  `lowband coordinator` runs it); writes its address, then its peak RSS (VmHWM) and summary when the run ends.
- `clients SPEC INDEX`: this process's share of the workers, one thread each, every one a real
  `CoordinatorClient` (its own gRPC channel): join, then per round push the process's SparseLoCo update (built
  once by the protocol's `make_update` on a perturbed copy of the parameters, reused under every worker id),
  long-poll `WaitRound` until the round closed and pull the aggregate. A heartbeat thread sends each worker's
  heartbeat every `heartbeat_interval_s`, as real workers do: `CoordinatorClient.beat`, skipped while the
  worker has a call open that the coordinator counts as proof of life and nothing new to say (here its step
  never changes); `--beat-always` beats regardless, as workers did before.
- `probe SPEC`: a dedicated client sending a heartbeat (as worker w0) every 0.1 s and timing each call.

SPEC is a JSON file written by bench/coordinator_scale.py; results are JSON files next to it.
"""

from __future__ import annotations

import asyncio
import bisect
import gc
import json
import os
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from itertools import pairwise
from pathlib import Path
from typing import Any

import torch

from bench import proc_memory
from bench.proc_memory import proc_status
from coordinator.server import CoordinatorServer
from protocols.config import PROTOCOL_VERSION, RunConfig, parse_config
from protocols.registry import build_protocol
from protocols.replica import Params
from protocols.wire import lowband_pb2_grpc, serde
from protocols.wire import messages as m
from worker.client import CoordinatorClient
from worker.model import GPT

VOCAB = 65  # the Shakespeare character vocabulary: the model is the default GPT at that size
PROBE_PERIOD_S = 0.1
MEMORY_PERIOD_S = 0.01
PEAK_STEP_BYTES = 2 << 20  # a new high by this much takes a breakdown of the resident set
LOOP_PERIOD_S = 0.05
LOOP_STALL_S = 0.5  # a quarter of the heartbeat interval


def initial_params(cfg: RunConfig) -> Params:
    torch.manual_seed(cfg.seed)
    return {name: p.detach().clone() for name, p in GPT(cfg.model, VOCAB).named_parameters()}


def one_update(cfg: RunConfig, params: Params, seed: int) -> Any:
    """A real SparseLoCo update: the protocol's worker half on a perturbed copy of the parameters."""
    protocol = build_protocol(cfg)
    gen = torch.Generator().manual_seed(seed)
    local = {n: t + 1e-3 * torch.randn(t.shape, generator=gen) for n, t in params.items()}
    update, _ = protocol.make_update(local, params, protocol.init_worker_state(params))
    return update


def _write(path: Path, doc: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc))
    tmp.rename(path)


class Sections:
    """Where a round close spends its time, measured from outside the coordinator's code: the wall time of
    each `check_update` (decode and check one update, off the state lock), `RoundAggregator.fold` (fold it,
    under the lock), `RoundAggregator.close` (aggregate, outer step, downlink; under the lock) and
    `RunDir.save_checkpoint` (the recording thread), and how long a thread here waits to take the state lock,
    tried every 0.1 s.

    Memory, likewise from outside: the process's resident set sampled every MEMORY_PERIOD_S, and each wrapped
    call's interval, so the peak is attributed to what was running then (`memory_report`): the sections above,
    plus reading a push's payload (`read_push`), installing the initial state (`initial_state`), applying an
    aggregate to the replica (`apply`) and encoding an aggregate for its pulls (`encode_pull`).

    And the seconds the process spends in Python's garbage collections, per generation (`time_collections`, a
    `gc.callbacks` entry; a collection holds the interpreter throughout)."""

    def __init__(self) -> None:
        self.seconds: dict[str, list[float]] = {"check": [], "fold": [], "close": [], "checkpoint": [],
                                                "lock_wait": []}
        self.intervals: list[tuple[str, float, float]] = []
        self.rss: list[tuple[float, int]] = []
        self.at_peak: dict[str, int] = {}  # the resident set by kind at its highest sampled break-down
        self.cpu_at_close: list[float] = []  # the process's CPU seconds (every thread) as each round closed
        # Objects the garbage collector tracks (frozen ones apart), as each round closed: a count that grows from
        # round to round is something kept per round, and every full collection walks it.
        self.objects_at_close: list[int] = []
        self.loop_lag: list[float] = []
        self.gc: dict[int, list[float]] = {}  # per generation: collections, seconds, objects collected
        self._gc_started = 0.0
        self.beat_accepts: list[float] = []  # wall times a Heartbeat call reached the server's interceptor
        self.probe_handled: list[tuple[float, float]] = []  # the probe's (w0's) heartbeats: handler began, ended

    def time_collections(self, phase: str, info: dict[str, int]) -> None:  # a gc.callbacks entry
        if phase == "start":
            self._gc_started = time.perf_counter()
            return
        if time.perf_counter() - self._gc_started > LOOP_STALL_S:
            self.intervals.append((f"gc{info['generation']}", self._gc_started, time.perf_counter()))
        tally = self.gc.setdefault(info["generation"], [0, 0.0, 0])
        tally[0] += 1
        tally[1] += time.perf_counter() - self._gc_started
        tally[2] += info["collected"]

    def wrap(self, owner: Any, method: str, key: str) -> None:  # a class or a module
        original = getattr(owner, method)

        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                t1 = time.perf_counter()
                if key == "close":
                    self.cpu_at_close.append(time.process_time())
                    self.objects_at_close.append(len(gc.get_objects()))
                if key in self.seconds:
                    self.seconds[key].append(t1 - t0)
                self.intervals.append((key, t0, t1))

        setattr(owner, method, timed)

    def trace_heartbeats(self, interceptor: Any, servicer: Any) -> None:
        """Where a probe's heartbeat spent its time inside the coordinator (`heartbeat_split` in
        bench.coordinator_scale): when the call reached the server's interceptor, the first code of ours a call
        runs on the loop, and when the handler's work began and ended. Wall clock, as the probe's."""
        intercept, handle = interceptor.intercept_service, servicer._heartbeat

        async def accepted(this: Any, continuation: Any, details: Any) -> Any:
            if details.method.endswith("/Heartbeat"):
                self.beat_accepts.append(time.time())
            return await intercept(this, continuation, details)

        def handled(this: Any, request: Any) -> Any:
            t0 = time.time()
            try:
                return handle(this, request)
            finally:
                if request.envelope.worker_id == "w0":
                    self.probe_handled.append((t0, time.time()))

        interceptor.intercept_service, servicer._heartbeat = accepted, handled

    def watch_lock(self, lock: Any, stop: threading.Event) -> None:
        while not stop.wait(PROBE_PERIOD_S):
            t0 = time.perf_counter()
            with lock:
                self.seconds["lock_wait"].append(time.perf_counter() - t0)

    async def watch_loop(self, stop: threading.Event) -> None:
        """On the server's event loop: how late each LOOP_PERIOD_S sleep wakes is how long a call that came in
        then (a heartbeat) waited for the loop before its first line ran. Stalls past LOOP_STALL_S are kept."""
        while not stop.is_set():
            t0 = time.perf_counter()
            await asyncio.sleep(LOOP_PERIOD_S)
            t1 = time.perf_counter()
            late = t1 - t0 - LOOP_PERIOD_S
            self.loop_lag.append(late)
            if late > LOOP_STALL_S:
                self.intervals.append(("loop_stall", t0 + LOOP_PERIOD_S, t1))

    def watch_memory(self, stop: threading.Event) -> None:
        """The resident set every MEMORY_PERIOD_S and, at each new high by PEAK_STEP_BYTES or more, what it is
        made of then (`proc_memory.breakdown`, a few ms: taken at new highs only), so the row can say what the
        peak held, where the breakdown at the run's end says only what stayed."""
        high = 0
        while not stop.wait(MEMORY_PERIOD_S):
            rss = proc_status()["VmRSS"]
            self.rss.append((time.perf_counter(), rss))
            if rss >= high + PEAK_STEP_BYTES:
                high = rss
                self.at_peak = proc_memory.breakdown() | {"rss": rss}

    def report(self) -> dict[str, Any]:
        """Max and mean seconds per section, and the coordinator's CPU seconds in each round after the first
        (close to close: that round's pulls of the previous aggregate, pushes, checks, folds and close)."""
        return {f"max_{k}_s": max(v, default=0.0) for k, v in self.seconds.items()} | {
            f"mean_{k}_s": sum(v) / len(v) if v else 0.0 for k, v in self.seconds.items()} | {
            "coordinator_cpu_s_by_round": [b - a for a, b in pairwise(self.cpu_at_close)],
            "tracked_objects_by_round": self.objects_at_close,
            "gc_by_generation": {str(g): {"collections": n, "seconds": sec, "collected": int(got)}
                                 for g, (n, sec, got) in sorted(self.gc.items())},
            "gc_s": sum(sec for _, sec, _ in self.gc.values())} | self.stall_report()

    def stall_report(self) -> dict[str, Any]:
        """The event loop's lateness (max, 99th percentile) and, for its stalls past LOOP_STALL_S, how many there
        were and how often each kind of wrapped call (or a garbage collection) overlapped one."""
        stalls = [(t0, t1) for key, t0, t1 in self.intervals if key == "loop_stall"]
        during: dict[str, int] = {}
        for key, t0, t1 in self.intervals:
            if key != "loop_stall" and any(t0 < s1 and s0 < t1 for s0, s1 in stalls):
                during[key] = during.get(key, 0) + 1
        lag = sorted(self.loop_lag)
        return {"max_loop_lag_s": lag[-1] if lag else 0.0,
                "p99_loop_lag_s": lag[int(0.99 * (len(lag) - 1))] if lag else 0.0,
                "loop_stalls": len(stalls), "calls_overlapping_stalls": during}

    def memory_report(self, model_bytes: int) -> dict[str, Any]:
        """The sampled peak and what was running at it (how many calls of each kind), and per kind of call the
        most the resident set rose during one call over its sample just before the call began, in model sizes."""
        if not self.rss:
            return {}
        times = [t for t, _ in self.rss]
        peak_t, peak = max(self.rss, key=lambda s: s[1])
        active: dict[str, int] = {}
        rise: dict[str, float] = {}
        for key, t0, t1 in self.intervals:
            if t0 <= peak_t <= t1:
                active[key] = active.get(key, 0) + 1
            before = bisect.bisect_right(times, t0) - 1
            # The call's own samples only: scanning every later sample made this quadratic in the run's length
            # (a minute of the coordinator's CPU at 1,000 workers, inside what `--perf` sampled).
            end = bisect.bisect_right(times, t1 + MEMORY_PERIOD_S)
            during = [r for _, r in self.rss[max(before, 0):end]]
            if before >= 0 and during:
                rise[key] = max(rise.get(key, 0.0), (max(during) - self.rss[before][1]) / model_bytes)
        return {"sampled_peak_rss_bytes": peak, "running_at_peak": active, "max_rise_over_model": rise,
                "rss_samples": len(self.rss), "memory_by_kind_at_peak": self.at_peak}


def run_coordinator(spec: dict[str, Any], work: Path) -> None:
    import coordinator.pushes
    import coordinator.server
    import protocols.round
    from coordinator.rundir import RunDir
    from coordinator.servicer import CoordinatorServicer, EncodedAggregates
    from coordinator.state import CoordinatorState
    from coordinator.traffic import ControlTraffic
    from protocols.round import RoundAggregator

    cfg = parse_config(spec["config"])
    sections = Sections()
    sections.wrap(coordinator.pushes, "check_update", "check")
    sections.wrap(RoundAggregator, "fold", "fold")
    sections.wrap(RoundAggregator, "close", "close")
    sections.wrap(RunDir, "save_checkpoint", "checkpoint")
    sections.wrap(serde, "read_push", "read_push")
    sections.wrap(CoordinatorState, "offer_initial_state", "initial_state")
    sections.wrap(protocols.round, "apply_aggregate", "apply")
    sections.wrap(EncodedAggregates, "of", "encode_pull")
    sections.trace_heartbeats(ControlTraffic, CoordinatorServicer)
    if not spec.get("malloc_tuning", True):  # the comparison row: glibc's malloc as it comes
        def untuned() -> dict[str, bool]:
            return {}

        coordinator.server.tune_malloc = untuned  # type: ignore[assignment]
    gc.callbacks.append(sections.time_collections)
    server = CoordinatorServer(cfg, run_dir=work / "run").start()
    stop = threading.Event()
    threading.Thread(target=sections.watch_lock, args=(server.state._cond, stop), daemon=True).start()
    threading.Thread(target=sections.watch_memory, args=(stop,), daemon=True).start()
    asyncio.run_coroutine_threadsafe(sections.watch_loop(stop), server.loop_thread.loop)
    _write(work / "coordinator.json", {"address": server.address, "pid": os.getpid(),
                                       "baseline": proc_status(), "baseline_by_kind": proc_memory.breakdown()})
    try:
        finished = server.wait_finished(timeout=spec["timeout_s"])
        server.wait_departed(spec["timeout_s"])  # 1,000 final pulls can take past a minute on this machine
        summary = server.summary()
        # While the server still stands: its pool's threads, once started, stay until it stops.
        by_kind = proc_memory.breakdown()
    finally:
        stop.set()
        server.stop()
    status = proc_status()
    replica = server.state.aggregator.replica.params if server.state.aggregator is not None else {}
    model_bytes = sum(t.numel() * 4 for t in replica.values()) or 1
    _write(work / "coordinator_done.json", {"finished": finished, "summary": summary, "status": status,
                                            "memory_by_kind": by_kind,
                                            "sections": sections.report(),
                                            "heartbeat_trace": {"accepts": sections.beat_accepts,
                                                                "probe_handled": sections.probe_handled},
                                            "memory": sections.memory_report(model_bytes)})


def run_clients(spec: dict[str, Any], index: int, work: Path) -> None:
    torch.set_num_threads(1)
    cfg = parse_config(spec["config"])
    count = spec["clients"][index]
    params = initial_params(cfg)
    update = one_update(cfg, params, seed=1 + index)
    address, rounds = spec["address"], cfg.rounds
    clients = [CoordinatorClient(address, retry_for_s=spec["timeout_s"]) for _ in range(count)]
    for c in clients:
        reply = c.join(f"scale-{index}")
        if not reply.has_global_state:
            c.offer_state(params)
    done = threading.Event()
    beats = {"sent": 0, "skipped": 0}

    def heartbeats() -> None:  # each worker's heartbeat every interval, spread over the interval
        period = cfg.cluster.heartbeat_interval_s / max(count, 1)
        while not done.is_set():
            for c in clients:
                if done.wait(period):
                    return
                if spec.get("beat_always"):
                    c.heartbeat(0, None, None)
                    beats["sent"] += 1
                elif c.beat(0, None, retry=True):  # the workers' own rule (their step never changes here)
                    beats["sent"] += 1
                else:
                    beats["skipped"] += 1

    def worker(c: CoordinatorClient) -> list[float]:
        try:
            return rounds_of(c)
        except BaseException:  # said at once: pool.map would keep it until every earlier worker had finished
            traceback.print_exc()
            sys.stderr.flush()
            raise

    def rounds_of(c: CoordinatorClient) -> list[float]:
        pushes = []
        while c.wait_round(-1).phase is m.Phase.WAITING_FOR_WORKERS:  # round 0 opens once all N joined
            pass
        for r in range(rounds):
            t0 = time.monotonic()
            c.push(r, update, {"tokens": 0.0})
            pushes.append(time.monotonic() - t0)
            while True:
                info = c.wait_round(r)
                if info.round > r or info.phase is m.Phase.FINISHED:
                    break
            c.pull_aggregate(r, own_update=update)
        return pushes

    beat_thread = threading.Thread(target=heartbeats, daemon=True)
    beat_thread.start()
    started = time.time()
    with ThreadPoolExecutor(max_workers=count) as pool:
        push_s = [s for res in pool.map(worker, clients) for s in res]
    done.set()
    beat_thread.join()
    traffic = [c.traffic.as_dict() for c in clients]
    for c in clients:
        c.leave()
        c.close()
    _write(work / f"clients{index}.json", {
        "started": started, "ended": time.time(), "push_s": push_s, "update_bytes": update.nbytes(),
        "traffic": {k: sum(t[k] for t in traffic) for k in traffic[0]}, "workers": count,
        "heartbeats": beats["sent"], "heartbeats_skipped": beats["skipped"], "cpu_s": sum(os.times()[:2])})


def run_probe(spec: dict[str, Any], work: Path) -> None:
    """Heartbeats as w0 every PROBE_PERIOD_S (no run id: the coordinator checks it only when given), each
    call timed; NOT_FOUND before w0 joined is recorded as not ok. Stops when `stop_probe` appears."""
    import grpc

    channel = grpc.insecure_channel(spec["address"], options=m.GRPC_OPTIONS)
    stub = lowband_pb2_grpc.CoordinatorStub(channel)
    samples = []
    while not (work / "stop_probe").exists():
        req = m.HeartbeatRequest(envelope=m.Envelope("", "w0", 0, PROTOCOL_VERSION, ""), inner_step=0,
                                 last_loss=float("nan"), bytes_sent=0, eval_loss=float("nan"))
        t0, wall = time.monotonic(), time.time()
        try:
            stub.Heartbeat(serde.to_pb(req), timeout=60.0)
            ok = True
        except grpc.RpcError:
            ok = False
        samples.append((wall, time.monotonic() - t0, ok))
        if len(samples) == 1:  # the clients start only now, so even a short run is probed (bench.coordinator_scale)
            (work / "probe_ready").touch()
        time.sleep(max(0.0, PROBE_PERIOD_S - (time.monotonic() - t0)))
    channel.close()
    _write(work / "probe.json", {"samples": samples})


def main(argv: list[str]) -> None:
    role, spec_path = argv[0], Path(argv[1])
    spec = json.loads(spec_path.read_text())
    work = spec_path.parent
    if role == "coordinator":
        run_coordinator(spec, work)
    elif role == "clients":
        run_clients(spec, int(argv[2]), work)
    elif role == "probe":
        run_probe(spec, work)
    else:
        raise SystemExit(f"unknown role {role!r}: coordinator, clients or probe")


if __name__ == "__main__":
    main(sys.argv[1:])
