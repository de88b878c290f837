"""Fault tolerance: a DiLoCo run whose last worker is SIGKILLed mid-round every N rounds and restarted under
its `--name`, side by side with the same run without faults, on the same data and token budget.

Contenders (a coordinator in this process, every worker a real `lowband worker` process on loopback):
- `fault-free`: the run as `lowband coordinator` runs it (a checkpoint and a metrics row every round).
- `faulty`: the same, and the victim kills itself (`--crash-at-step`, a real SIGKILL) half-way through
  round N, 2N, ...; once the coordinator has noticed (heartbeat timeout), it is restarted with the same
  `--name`, rejoins as the same worker on the same shard and continues the schedule from the global step.
  Rounds wait for it (`min_workers` = `workers`): the round it died in closes with its update from the
  restarted process, so no round loses a shard and the kill schedule stays in global rounds; what a fault
  costs in tokens is the half round the dead process computed, in time the detection and the restart.
- `ft-off`: the fault-free run with the fault-tolerance machinery the coordinator owns switched off: no
  run directory, so no per-round checkpoint (temp file, fsync, rename) and no metrics rows. Heartbeats
  stay on: a worker always sends them.

Columns:
- `training_efficiency`: useful tokens (those in updates the aggregator folded) over every token a worker
  process computed, the lost work of killed processes included. A killed process computed from the global
  step it started at (its first round, from its log) to the step it died at.
- `eval_loss` (the workers' final eval, mean) and `eval_loss_vs_fault_free`.
- `detect_s`: from a victim's death (its exit seen here) to the coordinator marking it not alive; `rejoin_s`:
  from its restart to the coordinator accepting its join (process start and imports; the corpus and the
  model are built after the join, while the pulled replica is on its way); both the mean over faults.
- `wall_s`, `wall_vs_ft_off`: from the coordinator's start to the last worker's exit.
- `train_s`, `train_vs_ft_off`: from the moment every worker has joined to the close of the last round: the
  cost of the machinery per round, without the workers' process start-up and imports.
- With `--repeats R`, fault-free and ft-off run R times each, in pairs whose order alternates; their rows hold
  the medians over the repeats, and fault-free's `*_vs_ft_off` is the median over the pairs of the pair's ratio
  (a pair's two runs see much the same load). Every run is in the JSON's `runs`.

Targets (issue "A coordinator you can trust"): efficiency >= 95%, eval loss within 2% of fault-free, rejoin
within 10 s, fault-free overhead <= 1% against ft-off.

    python -m bench.faults --rounds 6 --every 2 --inner-steps 6
    python -m bench.faults --rounds 8 --every 4 --inner-steps 40 --repeats 5   # the overhead, over 5 pairs
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

from bench.common import command_line, write_result
from coordinator.server import CoordinatorServer
from coordinator.state import Phase
from protocols.config import RunConfig, parse_config

CONTENDERS = ("fault-free", "faulty", "ft-off")
COLUMNS = ["contender", "faults", "training_efficiency", "eval_loss", "eval_loss_vs_fault_free", "detect_s",
           "rejoin_s", "wall_s", "wall_vs_ft_off", "train_s", "train_vs_ft_off", "repeats", "useful_tokens",
           "compute_tokens"]
_ROUND_LINE = re.compile(r"^(\S+) round (\d+) step (\d+):", re.MULTILINE)


def bench_config(workers: int, rounds: int, inner_steps: int) -> RunConfig:
    """A small GPT on 2 CPU cores; a worker silent for 2 s is marked dead, and a round waits for all."""
    return parse_config({
        "name": "faults",
        "model": {"n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 64},
        "data": {"batch_size": 8, "max_chars": 200_000},
        "train": {"steps": rounds * inner_steps, "lr": 3e-3, "warmup_steps": inner_steps, "eval_batches": 4,
                  "eval_every_steps": rounds * inner_steps},
        "protocol": {"kind": "diloco", "inner_steps": inner_steps},
        "cluster": {"workers": workers, "round_deadline_s": 600,
                    "heartbeat_interval_s": 0.5, "heartbeat_timeout_s": 2.0},
    })


def _spawn(address: str, name: str, work: Path, n: int, crash_at: int | None) -> subprocess.Popen[bytes]:
    args = [sys.executable, "-m", "deploy.cli", "worker", "--join", address, "--name", name, "--threads", "1",
            "--retry-for", "120", "--result-json", str(work / f"{name}.{n}.json")]
    if crash_at is not None:
        args += ["--crash-at-step", str(crash_at)]
    return subprocess.Popen(args, stdout=(work / f"{name}.{n}.log").open("wb"), stderr=subprocess.STDOUT)


def _wait(condition: Any, timeout: float, what: str) -> float:
    """Poll `condition` every 10 ms; the time it became true."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)
    return time.monotonic()


def _killed_steps(log: Path, crash_at: int, inner_steps: int) -> int:
    """Steps a killed process computed: from the start of its first round (its first progress line) to
    `crash_at` (none printed: it died in its first round, which began at the last round start before it)."""
    rounds = [int(m.group(2)) for m in _ROUND_LINE.finditer(log.read_text(errors="replace"))]
    first = rounds[0] if rounds else crash_at // inner_steps
    return crash_at - first * inner_steps


def _phase_times(server: CoordinatorServer, stop: threading.Event) -> dict[Phase, float]:
    """A dict that gets the time the run first entered each phase after WAITING, polled every 5 ms: TRAINING
    (every worker joined) and FINISHED (the last round closed)."""
    seen: dict[Phase, float] = {}

    def poll() -> None:
        while not stop.is_set() and Phase.FINISHED not in seen:
            phase = server.state.phase
            if phase is not Phase.WAITING:
                seen.setdefault(Phase.TRAINING, time.monotonic())
                if phase is Phase.FINISHED:
                    seen[Phase.FINISHED] = time.monotonic()
            time.sleep(0.005)

    threading.Thread(target=poll, daemon=True, name="phase-times").start()
    return seen


def run_contender(contender: str, cfg: RunConfig, every: int, work: Path) -> dict[str, Any]:
    work.mkdir(parents=True)
    h, n = cfg.inner_steps, cfg.cluster.workers
    run_dir = None if contender == "ft-off" else work / "run"
    kills = [r * h + h // 2 for r in range(every, cfg.rounds, every)] if contender == "faulty" else []
    server = CoordinatorServer(cfg, run_dir=run_dir).start()
    started = time.monotonic()
    stop = threading.Event()
    phases = _phase_times(server, stop)
    victim = f"w{n - 1}"
    procs = {f"w{i}": _spawn(server.address, f"w{i}", work, 0, None) for i in range(n - 1)}
    lost_steps, detect, rejoin = 0, [], []
    try:
        for k, crash_at in enumerate([*kills, None]):
            proc = _spawn(server.address, victim, work, k, crash_at)
            spawned = time.monotonic()
            joined = _wait(lambda k=k: any(m.worker_id == victim and m.joins == k + 1
                                           for m in server.state.members_copy()), 300, f"{victim} to join")
            if k:
                rejoin.append(joined - spawned)
            if crash_at is None:
                procs[victim] = proc
                break
            died = _wait(lambda p=proc: p.poll() is not None, 600, f"{victim} to die at step {crash_at}")
            if proc.returncode != -9:
                raise RuntimeError(f"{victim} exited {proc.returncode}, not by SIGKILL:\n"
                                   f"{(work / f'{victim}.{k}.log').read_text()[-2000:]}")
            noticed = _wait(lambda: not any(m.worker_id == victim and m.alive for m in server.state.members_copy()),
                            120, f"the coordinator to notice {victim} died")
            detect.append(noticed - died)
            lost_steps += _killed_steps(work / f"{victim}.{k}.log", crash_at, h)
        if not server.wait_finished(timeout=1800):
            raise TimeoutError(f"{contender}: the run did not finish")
        server.wait_departed(120.0)
        for name, proc in procs.items():
            if proc.wait(timeout=120) != 0:
                raise RuntimeError(f"{contender}: {name} exited {proc.returncode}")
        wall = time.monotonic() - started
        _wait(lambda: Phase.FINISHED in phases, 10, "the phase poller to see the run finish")
        summary = server.summary()
    finally:
        stop.set()
        server.stop()
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
    tokens_per_step = cfg.data.batch_size * cfg.model.block_size
    survivors = sum(json.loads((work / f"{w}.{k}.json").read_text())["steps"]
                    for w, k in [*((f"w{i}", 0) for i in range(n - 1)), (victim, len(kills))])
    compute = (survivors + lost_steps) * tokens_per_step
    return {"contender": contender, "faults": len(kills), "training_efficiency": summary["tokens"] / compute,
            "eval_loss": summary["final_eval_loss"], "detect_s": sum(detect) / len(detect) if detect else None,
            "rejoin_s": sum(rejoin) / len(rejoin) if rejoin else None, "wall_s": wall,
            # From every worker joined to the last round closed: what the machinery costs per round, without
            # the workers' process start-up and imports (seconds of noise on a shared machine).
            "train_s": phases[Phase.FINISHED] - phases[Phase.TRAINING],
            "useful_tokens": summary["tokens"], "compute_tokens": compute, "rounds": summary["rounds"],
            "state_hash": summary["state_hash"]}


def run_all(cfg: RunConfig, every: int, repeats: int, work: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """`faulty` once, then `fault-free` and `ft-off` `repeats` times each, in pairs whose order alternates (so a
    drift in the machine's load does not favour one side). The rows (one per contender: the medians over its
    repeats, `train_vs_ft_off` the median over the pairs of the pair's ratio) and every run."""
    runs = [run_contender("faulty", cfg, every, work / "faulty")]
    for i in range(repeats):
        pair = ("fault-free", "ft-off") if i % 2 == 0 else ("ft-off", "fault-free")
        runs += [{**run_contender(c, cfg, every, work / f"{c}.{i}"), "repeat": i} for c in pair]
    rows = []
    for contender in CONTENDERS:
        mine = [r for r in runs if r["contender"] == contender]
        row = {**mine[0], "repeats": len(mine)}
        for key in ("wall_s", "train_s", "eval_loss", "training_efficiency"):
            row[key] = statistics.median(r[key] for r in mine)
        rows.append(row)
    by = {r["contender"]: r for r in rows}
    pairs = [(next(r for r in runs if r.get("repeat") == i and r["contender"] == "fault-free"),
              next(r for r in runs if r.get("repeat") == i and r["contender"] == "ft-off")) for i in range(repeats)]
    for r in rows:
        r["eval_loss_vs_fault_free"] = r["eval_loss"] / by["fault-free"]["eval_loss"]
        r["wall_vs_ft_off"] = r["wall_s"] / by["ft-off"]["wall_s"]
        r["train_vs_ft_off"] = r["train_s"] / by["ft-off"]["train_s"]
    by["fault-free"]["train_vs_ft_off"] = statistics.median(a["train_s"] / b["train_s"] for a, b in pairs)
    by["fault-free"]["wall_vs_ft_off"] = statistics.median(a["wall_s"] / b["wall_s"] for a, b in pairs)
    by["ft-off"]["train_vs_ft_off"] = by["ft-off"]["wall_vs_ft_off"] = 1.0
    return rows, runs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--inner-steps", type=int, default=10, help="H, inner steps per round")
    parser.add_argument("--every", type=int, default=4, help="kill the victim every N rounds (mid-round)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs of fault-free and of ft-off each, in alternating pairs (the overhead is the "
                             "median of the pairs' ratios)")
    parser.add_argument("--out", default="faults", help="result name in bench/results")
    args = parser.parse_args(argv)
    if args.workers < 2 or args.every < 1 or args.rounds <= args.every or args.inner_steps < 2 or args.repeats < 1:
        parser.error("need --workers >= 2, --inner-steps >= 2, --repeats >= 1 and --rounds > --every >= 1 (at least "
                     "one fault)")
    torch.set_num_threads(1)
    cfg = bench_config(args.workers, args.rounds, args.inner_steps)
    with tempfile.TemporaryDirectory(prefix="lowband-faults-") as tmp:
        rows, runs = run_all(cfg, args.every, args.repeats, Path(tmp))
    write_result(args.out, command_line("bench.faults"), rows, COLUMNS, runs=runs,
                 config={"workers": args.workers, "rounds": args.rounds, "inner_steps": args.inner_steps,
                         "every": args.every, "repeats": args.repeats})


if __name__ == "__main__":
    main()
