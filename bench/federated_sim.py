"""`lowband simulate` against Flower's Ray simulation engine on the same federated `digits` task, side by side in
one invocation; plus the peak memory of 10,000 simulated Shakespeare LoRA clients.

    python -m bench.federated_sim [--rounds-100 50] [--rounds-1000 40] [--shakespeare-clients 10000]
                                  [--shakespeare-rounds 3] [--no-flower] [--no-shakespeare] [--out federated_sim]

Rows (each contender a fresh process, one at a time):

- `lowband-100x10`, `lowband-1000x100`: `lowband simulate fedavg-digits` (python -m deploy.cli) with 100 clients
  (10 a round) and 1,000 clients (100 a round): 2 pool workers, threads of one process, one torch thread each.
  It starts neither Ray nor a server, so it runs as a plain process.
- `flower-100x10`, `flower-1000x100`: bench/flower_digits.py, Flower's FedAvg in `flwr.simulation.run_simulation`
  (the Ray backend, one CPU per client actor: 2 actors on 2 cores, as lowband's 2 pool workers), inside
  deploy/loopback.sh (Ray starts servers), in its own environment `.bench-envs/flower`, which this script
  creates when missing: `python -m venv`, then `pip install torch==2.13.0` first (the CPU wheel), then
  `flwr[simulation]` (pinned: FLOWER_REQUIREMENT), scikit-learn, numpy, psutil. Never the project's environment.
- `lowband-shakespeare-10k`: `lowband simulate fedsvd-shakespeare` with simulation.clients=10000 (role pieces of
  the plays), a few rounds, init_from null (a fresh base: memory, not quality, is measured); DP-SGD on.

The same task on both digits sides: the 64-64-10 MLP after `torch.manual_seed(seed)`, the Dirichlet (alpha 0.5)
shards of `worker.federated.partition.dirichlet`, the stratified 20% eval split of
`worker.federated.digits.load_digits_split` (Flower imports these three from lowband), lowband's seeded client
sampling and per-client batch seeds (mirrored in bench/flower_digits.py), one local epoch of SGD at lr 0.05 in
batches of 16, the sample-weighted FedAvg mean, server-side evaluation after every round. Same seed, same rounds.

Measurement. Every process is launched from here; `first_round_s` is from its launch (time.time() just before
the Popen: interpreter start and imports included; for Flower also the namespace set-up of loopback.sh) to the
moment its first round's line (eval included) reaches this process on its stdout. `rounds_per_s` is the steady
state: rounds after the first `--warmup` ones over the time from the end of round `warmup` to the end of the last.
`peak_rss_bytes` is the largest sum of RSS over the process and all its descendants (Ray's GCS, raylet, actors,
...), sampled every 0.1 s; shared pages (Ray's object store) count once per process mapping them. `accuracy` and
`eval_loss` are the server's after the last round. `bytes_{sent,received,total}_per_worker`: between the server
and the processes that train, both ways (`wire_bytes`): lowband's 2 pool workers send one partial each a round
and read the replica; Flower's model arrays go to and come back from every sampled client, split over its 2
client actors. Lowband rows carry `rounds_per_s_vs_flower` and
`accuracy_minus_flower` (against the Flower row of the same clients).

Targets (evaluated into `targets`, honestly): at 1,000 clients with 100 a round lowband runs >= 5x Flower's
rounds per second with accuracy within 1 point; lowband's first round ends within 3 s of its process start
(each digits row); 10,000 simulated Shakespeare LoRA clients fit in 24 GiB (peak RSS of that row).

Writes bench/results/<out>.json and <out>.png (rounds per second, accuracy per round).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

from bench.common import RESULTS, command_line, write_result

ROOT = Path(__file__).resolve().parents[1]
FLOWER_ENV = ROOT / ".bench-envs" / "flower"
LOOPBACK = ROOT / "deploy" / "loopback.sh"
TORCH_REQUIREMENT = "torch==2.13.0"
FLOWER_REQUIREMENT = "flwr[simulation]==1.42.0"
# Flower's client actors: one CPU each (flower_digits.py --cpus-per-client 1) on this 2-core machine, as lowband's
# 2 pool workers: the per-worker byte counts split the model traffic over them.
FLOWER_CLIENT_ACTORS = 2
GIB = 2**30
MEMORY_LIMIT_BYTES = 24 * GIB
SPEEDUP_TARGET, ACCURACY_POINTS, FIRST_ROUND_S = 5.0, 0.01, 3.0
ROUND_LINE = re.compile(r"^round (\d+)/(\d+): (\d+) of (\d+) clients aggregated")
COLUMNS = ["contender", "clients", "clients_per_round", "rounds", "rounds_per_s", "first_round_s", "peak_rss_bytes",
           "accuracy", "eval_loss", "bytes_sent_per_worker", "bytes_received_per_worker", "bytes_total_per_worker",
           "rounds_per_s_vs_flower", "accuracy_minus_flower", "wall_s"]


@dataclass
class Plan:
    rounds_100: int = 50  # 100 clients, 10 a round
    rounds_1000: int = 40  # 1,000 clients, 100 a round
    shakespeare_clients: int = 10_000
    shakespeare_rounds: int = 3
    seed: int = 0
    warmup: int = 1  # rounds left out of rounds_per_s
    flower: bool = True
    shakespeare: bool = True
    timeout_s: float = 600.0  # per process


@dataclass
class Proc:
    """A finished contender process: its round lines (each stamped on arrival) and its memory."""

    launched: float
    rounds: list[dict[str, Any]]
    load_avg: tuple[float, float]  # the machine's 1-minute load average at launch and at the end
    peak_rss_bytes: int
    returncode: int
    wall_s: float
    log: Path
    extra: dict[str, Any] = field(default_factory=dict)

    def tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""


def tree_rss(proc: psutil.Process) -> tuple[int, list[psutil.Process]]:
    """Summed RSS of `proc` and every descendant, and the descendants."""
    try:
        kids = proc.children(recursive=True)
    except psutil.Error:
        return 0, []
    total = 0
    for p in [proc, *kids]:
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return total, kids


def watch(cmd: list[str], log: Path, parse: Callable[[str], dict[str, Any] | None], env: dict[str, str] | None = None,
          timeout_s: float = 600.0, interval_s: float = 0.1) -> Proc:
    """Run `cmd` (cwd: the repository) to its end: every stdout line `parse` recognises is kept with its arrival
    time `t`; peak RSS of the process tree sampled every `interval_s`. Descendants left behind are killed."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    log.parent.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()[0]
    with log.open("w") as sink:
        launched = time.time()
        popen = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=sink, text=True,
                                 bufsize=1)
        root = psutil.Process(popen.pid)
        seen: dict[int, psutil.Process] = {}
        peak = [0]
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                total, kids = tree_rss(root)
                peak[0] = max(peak[0], total)
                seen.update((k.pid, k) for k in kids)
                done.wait(interval_s)

        def kill() -> None:
            popen.kill()

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        watchdog = threading.Timer(timeout_s, kill)
        watchdog.start()
        rounds = []
        assert popen.stdout is not None
        for line in popen.stdout:
            t = time.time()
            sink.write(line)
            row = parse(line.rstrip("\n"))
            if row is not None:
                rounds.append({**row, "t": t})
        returncode = popen.wait()
        wall = time.time() - launched
        watchdog.cancel()
        done.set()
        sampler.join()
    for p in seen.values():  # what the process started and left running (Ray's daemons on a crash)
        with contextlib.suppress(psutil.Error):
            if p.is_running():
                p.kill()
    return Proc(launched, rounds, (load_before, os.getloadavg()[0]), peak[0], returncode, wall, log)


def steady(proc: Proc, warmup: int) -> dict[str, Any]:
    """rounds_per_s after `warmup` rounds, first_round_s from launch."""
    ts = [r["t"] for r in proc.rounds]
    out: dict[str, Any] = {"first_round_s": ts[0] - proc.launched if ts else None, "rounds_per_s": None}
    later = ts[max(warmup, 1) - 1:]
    if len(later) >= 2 and later[-1] > later[0]:
        out["rounds_per_s"] = (len(later) - 1) / (later[-1] - later[0])
    return out


# --- lowband ---------------------------------------------------------------------------------------------------


def one_thread_per_pool_worker() -> bool:
    """Whether `lowband simulate` pins torch to one intra-op thread (the pool's workers are threads)."""
    import inspect

    from deploy.cli import cmd_simulate

    return "torch.set_num_threads(1)" in inspect.getsource(cmd_simulate)


def _round_line(line: str) -> dict[str, Any] | None:
    m = ROUND_LINE.match(line)
    return None if m is None else {"round": int(m[1]), "aggregated": int(m[3]), "sampled": int(m[4])}


def run_lowband(recipe: str, name: str, overrides: list[str], work: Path, timeout_s: float) -> Proc:
    """`lowband simulate RECIPE` as a fresh process; its metrics.jsonl rows merged into the round lines."""
    sets = [f"run_dir={work}", f"name={name}", *overrides]
    cmd = [sys.executable, "-m", "deploy.cli", "simulate", recipe, *[a for s in sets for a in ("--set", s)]]
    proc = watch(cmd, work / f"{name}.log", _round_line, timeout_s=timeout_s)
    metrics = work / name / "metrics.jsonl"
    logged = [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.exists() else []
    by_round = {r["round"] + 1: r for r in logged if r.get("event") == "round"}
    for r in proc.rounds:
        logged_row = by_round.get(r["round"], {})
        r.update({k: logged_row[k] for k in ("eval_loss", "accuracy", "train_loss") if k in logged_row})
    summary = work / name / "summary.json"
    proc.extra = json.loads(summary.read_text()) if summary.exists() else {}
    return proc


def digits_overrides(clients: int, rounds: int, seed: int) -> list[str]:
    return [f"seed={seed}", f"simulation.clients={clients}", "simulation.fraction=0.1", f"simulation.rounds={rounds}",
            "simulation.eval_every=1"]


# --- Flower ----------------------------------------------------------------------------------------------------


def _env_ready(python: Path) -> bool:
    if not python.exists():
        return False
    probe = ("import flwr, ray, sklearn, numpy, psutil, torch; "
             "assert torch.__version__.endswith('+cpu'), torch.__version__")
    return subprocess.run([str(python), "-c", probe], capture_output=True).returncode == 0


def flower_python(env_dir: Path = FLOWER_ENV, log: Callable[[str], None] = print) -> Path:
    """The Flower environment's python, creating the environment first when it is missing or incomplete."""
    python = env_dir / "bin" / "python"
    if _env_ready(python):
        return python
    log(f"creating the Flower environment {env_dir} (torch first, then {FLOWER_REQUIREMENT})")
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(env_dir)], check=True)
    pip = [str(python), "-m", "pip", "install", "--quiet"]
    subprocess.run([*pip, TORCH_REQUIREMENT], check=True)  # first: the CPU wheel, before anything pulls CUDA
    subprocess.run([*pip, FLOWER_REQUIREMENT, "scikit-learn", "numpy", "psutil"], check=True)
    if not _env_ready(python):
        raise RuntimeError(f"{env_dir}: flwr, ray and a CPU build of torch do not all import after installing")
    return python


def flower_version(python: Path) -> dict[str, str]:
    code = "import flwr, ray, torch; print(flwr.__version__, ray.__version__, torch.__version__)"
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True).stdout.split()
    return {"flwr": out[0], "ray": out[1], "torch": out[2]}


def _flower_line(line: str) -> dict[str, Any] | None:
    from bench.flower_digits import PREFIX

    if not line.startswith(PREFIX):
        return None
    row = json.loads(line[len(PREFIX):])
    row.pop("t", None)  # stamped on arrival, as lowband's lines
    return dict(row)


def run_flower(python: Path, name: str, clients: int, rounds: int, seed: int, work: Path, timeout_s: float) -> Proc:
    cmd = [str(LOOPBACK), str(python), "-m", "bench.flower_digits", "--clients", str(clients), "--fraction", "0.1",
           "--rounds", str(rounds), "--seed", str(seed)]
    return watch(cmd, work / f"{name}.log", _flower_line, env={"PYTHONPATH": str(ROOT)}, timeout_s=timeout_s)


# --- the bench -------------------------------------------------------------------------------------------------


def digits_row(contender: str, proc: Proc, clients: int, rounds: int, warmup: int) -> dict[str, Any]:
    if proc.returncode != 0 or len(proc.rounds) != rounds:
        raise RuntimeError(f"{contender}: exit {proc.returncode}, {len(proc.rounds)} of {rounds} rounds; log "
                           f"{proc.log}:\n{proc.tail()}")
    per_round = max(1, round(0.1 * clients))
    short = [r["round"] for r in proc.rounds if r["aggregated"] != per_round]
    if short:
        raise RuntimeError(f"{contender}: rounds {short} aggregated fewer than {per_round} clients; log {proc.log}")
    last = proc.rounds[-1]
    return {**wire_bytes(contender, proc, last),
            "contender": contender, "clients": clients, "clients_per_round": per_round, "rounds": len(proc.rounds),
            **steady(proc, warmup), "peak_rss_bytes": proc.peak_rss_bytes, "accuracy": last.get("accuracy"),
            "eval_loss": last.get("eval_loss"), "wall_s": proc.wall_s, "load_avg_1m": list(proc.load_avg),
            "round_end_s": [r["t"] - proc.launched for r in proc.rounds],
            "accuracy_curve": [r.get("accuracy") for r in proc.rounds],
            "eval_loss_curve": [r.get("eval_loss") for r in proc.rounds]}


def wire_bytes(contender: str, proc: Proc, last: dict[str, Any]) -> dict[str, Any]:
    """Bytes per worker, both ways, between the server and the processes that train: lowband's pool workers
    (its summary: the replica each read and the partials it sent), Flower's client actors (the model arrays to
    and from every sampled client, split over FLOWER_CLIENT_ACTORS)."""
    if contender.startswith("flower-"):
        sent, received = last.get("bytes_from_clients"), last.get("bytes_to_clients")
        if sent is None or received is None:
            return {}
        sent, received = sent / FLOWER_CLIENT_ACTORS, received / FLOWER_CLIENT_ACTORS
    else:
        s = proc.extra
        if "bytes_sent_per_worker" not in s:
            return {}
        sent, received = s["bytes_sent_per_worker"], s["bytes_received_per_worker"]
    return {"bytes_sent_per_worker": sent, "bytes_received_per_worker": received,
            "bytes_total_per_worker": sent + received}


def shakespeare_row(proc: Proc, clients: int, rounds: int, warmup: int) -> dict[str, Any]:
    if proc.returncode != 0 or len(proc.rounds) != rounds:
        raise RuntimeError(f"lowband-shakespeare: exit {proc.returncode}, {len(proc.rounds)} of {rounds} rounds; "
                           f"log {proc.log}:\n{proc.tail()}")
    s = proc.extra
    return {**wire_bytes("lowband-shakespeare", proc, {}),
            "contender": "lowband-shakespeare-10k" if clients == 10_000 else f"lowband-shakespeare-{clients}",
            "clients": s.get("clients"), "clients_per_round": proc.rounds[0]["sampled"], "rounds": len(proc.rounds),
            **steady(proc, warmup), "peak_rss_bytes": proc.peak_rss_bytes, "accuracy": None,
            "eval_loss": s.get("final_eval_loss"), "wall_s": proc.wall_s, "load_avg_1m": list(proc.load_avg),
            "protocol": s.get("protocol"),
            "clients_with_state": s.get("clients_with_state"), "clients_spilled": s.get("clients_spilled"),
            "dp_epsilon_max": s.get("dp_epsilon_max"), "noise_multiplier": s.get("noise_multiplier")}


def add_ratios(rows: list[dict[str, Any]]) -> None:
    flower = {r["clients"]: r for r in rows if r["contender"].startswith("flower-")}
    for r in rows:
        f = flower.get(r["clients"])
        if not r["contender"].startswith("lowband-") or f is None or "shakespeare" in r["contender"]:
            continue
        if r["rounds_per_s"] and f["rounds_per_s"]:
            r["rounds_per_s_vs_flower"] = r["rounds_per_s"] / f["rounds_per_s"]
        if r["accuracy"] is not None and f["accuracy"] is not None:
            r["accuracy_minus_flower"] = r["accuracy"] - f["accuracy"]


def targets(rows: list[dict[str, Any]]) -> dict[str, Any]:
    by = {r["contender"]: r for r in rows}
    out: dict[str, Any] = {}
    big = by.get("lowband-1000x100", {})
    ratio = big.get("rounds_per_s_vs_flower")
    out["rounds_per_s_vs_flower_1000x100"] = {
        "target": f">= {SPEEDUP_TARGET}", "value": ratio, "pass": None if ratio is None else ratio >= SPEEDUP_TARGET}
    gap = big.get("accuracy_minus_flower")
    out["accuracy_within_1_point_1000x100"] = {
        "target": f"|lowband - flower| <= {ACCURACY_POINTS}", "value": gap,
        "pass": None if gap is None else abs(gap) <= ACCURACY_POINTS + 1e-9}
    firsts = {c: r["first_round_s"] for c, r in by.items() if c in ("lowband-100x10", "lowband-1000x100")}
    out["lowband_first_round_s"] = {
        "target": f"<= {FIRST_ROUND_S} s from process start (each digits row)", "value": firsts,
        "pass": None if not firsts or None in firsts.values() else all(v <= FIRST_ROUND_S for v in firsts.values())}
    sh = next((r for c, r in by.items() if c.startswith("lowband-shakespeare")), None)
    out["shakespeare_10k_clients_fit_in_24_gib"] = {
        "target": f"peak RSS <= {MEMORY_LIMIT_BYTES} bytes (24 GiB) with 10,000 clients",
        "value": None if sh is None else sh["peak_rss_bytes"], "clients": None if sh is None else sh["clients"],
        "pass": None if sh is None else (sh["clients"] == 10_000 and sh["peak_rss_bytes"] <= MEMORY_LIMIT_BYTES)}
    return out


def collect(plan: Plan, work_dir: Path | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Every row of `plan`, one process at a time, with ratios and targets."""
    started = time.time()
    work = work_dir or Path(tempfile.mkdtemp(prefix="bench-federated-sim-"))
    doc: dict[str, Any] = {"plan": asdict(plan),
                           "lowband_one_torch_thread_per_pool_worker": one_thread_per_pool_worker()}
    python = None
    if plan.flower:
        python = flower_python(log=log)
        doc["flower"] = flower_version(python)
    rows: list[dict[str, Any]] = []
    for clients, rounds in ((100, plan.rounds_100), (1000, plan.rounds_1000)):
        tag = f"{clients}x{max(1, round(0.1 * clients))}"
        log(f"lowband-{tag}: {rounds} rounds")
        proc = run_lowband("fedavg-digits", f"lowband-{tag}", digits_overrides(clients, rounds, plan.seed), work,
                           plan.timeout_s)
        rows.append(digits_row(f"lowband-{tag}", proc, clients, rounds, plan.warmup))
        if python is not None:
            log(f"flower-{tag}: {rounds} rounds")
            proc = run_flower(python, f"flower-{tag}", clients, rounds, plan.seed, work, plan.timeout_s)
            rows.append(digits_row(f"flower-{tag}", proc, clients, rounds, plan.warmup))
    if plan.shakespeare:
        n, rounds = plan.shakespeare_clients, plan.shakespeare_rounds
        log(f"lowband-shakespeare: {n} clients, {rounds} rounds")
        overrides = [f"simulation.clients={n}", f"simulation.rounds={rounds}", "init_from=null"]
        proc = run_lowband("fedsvd-shakespeare", "lowband-shakespeare", overrides, work, plan.timeout_s)
        rows.append(shakespeare_row(proc, n, rounds, plan.warmup))
    add_ratios(rows)
    doc.update(rows=rows, targets=targets(rows), work_dir=str(work), wall_s=time.time() - started, notes=[
        "first_round_s: from this script's Popen of the process (interpreter start and imports included; Flower "
        "also pays deploy/loopback.sh's namespace set-up) to the arrival of its first round's line (eval included)",
        "rounds_per_s: rounds after the first `warmup` over the time from the end of round `warmup` to the last",
        "peak_rss_bytes: max over 0.1 s samples of the summed RSS of the process and all its descendants",
        "same task: Flower imports worker.federated.digits and worker.federated.partition; client sampling, "
        "client seeds and batches are lowband's (mirrored in bench/flower_digits.py, checked by the smoke test)",
        "load_avg_1m: the machine's 1-minute load average at the launch and at the end of the row's process "
        "(the machine is shared: other jobs slow both sides alike, but not evenly in time)",
        "flower: run_simulation (Ray backend), 1 CPU per client actor (2 actors on 2 cores); lowband: 2 pool "
        "workers (threads), one torch thread each",
    ])
    return doc


def plot(doc: dict[str, Any], path: Path) -> Path:
    """Rounds per second per digits row (bars) and server-side accuracy per round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in doc["rows"] if "accuracy_curve" in r]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = ["C0" if r["contender"].startswith("lowband") else "C1" for r in rows]
    left.bar([r["contender"] for r in rows], [r["rounds_per_s"] or 0.0 for r in rows], color=colors)
    for i, r in enumerate(rows):
        if r["rounds_per_s"]:
            left.annotate(f"{r['rounds_per_s']:.3g}", (i, r["rounds_per_s"]), ha="center", va="bottom", fontsize=8)
    left.set(ylabel="rounds per second (steady state)", yscale="log", title="rounds per second, digits FedAvg")
    left.tick_params(axis="x", labelsize=8)
    for r in rows:
        color = "C0" if r["clients"] == 100 else "C2"
        xs = range(1, len(r["accuracy_curve"]) + 1)
        if r["contender"].startswith("lowband"):
            right.plot(xs, r["accuracy_curve"], "-", color=color, label=r["contender"])
        else:
            right.plot(xs, r["accuracy_curve"], "o", color=color, markerfacecolor="none", markersize=5,
                       label=r["contender"])
    right.set(xlabel="round", ylabel="server-side accuracy",
              title="accuracy per round: lines lowband, circles Flower")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.federated_sim", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds-100", type=int, default=Plan.rounds_100, help="rounds at 100 clients, 10 a round")
    parser.add_argument("--rounds-1000", type=int, default=Plan.rounds_1000, help="rounds at 1,000, 100 a round")
    parser.add_argument("--shakespeare-clients", type=int, default=Plan.shakespeare_clients)
    parser.add_argument("--shakespeare-rounds", type=int, default=Plan.shakespeare_rounds)
    parser.add_argument("--warmup", type=int, default=Plan.warmup, help="first rounds left out of rounds_per_s")
    parser.add_argument("--seed", type=int, default=Plan.seed)
    parser.add_argument("--no-flower", action="store_true", help="lowband rows only (no Flower environment)")
    parser.add_argument("--no-shakespeare", action="store_true", help="skip the 10,000-client Shakespeare row")
    parser.add_argument("--out", default="federated_sim", help="result name under bench/results")
    args = parser.parse_args(argv)
    if min(args.rounds_100, args.rounds_1000, args.shakespeare_rounds) <= args.warmup:
        parser.error("every row needs more rounds than --warmup")
    plan = Plan(args.rounds_100, args.rounds_1000, args.shakespeare_clients, args.shakespeare_rounds, args.seed,
                args.warmup, not args.no_flower, not args.no_shakespeare)
    doc = collect(plan)
    rows = doc.pop("rows")
    path = write_result(args.out, command_line("bench.federated_sim"), rows, COLUMNS, **doc)
    print(plot({**doc, "rows": rows}, RESULTS / f"{args.out}.png"))
    for name, t in doc["targets"].items():
        verdict = {True: "PASS", False: "FAIL", None: "not measured"}[t["pass"]]
        print(f"target {name}: {t['value']} ({t['target']}): {verdict}")
    print(f"wall {doc['wall_s']:.0f} s; {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
