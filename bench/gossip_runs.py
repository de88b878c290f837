"""One contender's run for `bench.gossip`: its config, the transport it runs over, and its per-round curve.

Every run trains `steps` inner steps per worker (the token budget) in rounds of `inner_steps` on the same
tiny GPT and data, evaluating every round on the same `EVAL_BATCHES` fixed eval batches. What comes back is
a `Curve`: for k = 0..R completed rounds, the eval loss after k rounds and the bytes a worker had moved by
then (sent + received, averaged over the workers), plus the consensus distance per round (gossip only).

- gossip over `inproc` (deploy/gossip_inproc.py): node threads in this process, the rendezvous as an object.
  Its metrics.jsonl rows (coordinator/rendezvous.py) carry, per round r, `eval_loss`: the mean over the
  workers of each worker's *own* model evaluated at the start of round r (= after r rounds; the row of round
  R is every worker's final evaluation), the cumulative `bytes_total_per_worker` at the end of round r, and
  the consensus distance estimated from the workers' random-projection sketches.
- gossip over `p2p`: a `RendezvousServer` (gRPC) in this process and one spawned process per worker running
  `run_p2p_worker` (what `lowband worker --join` runs), models going worker to worker over the Peer service.
  Same rows. Bytes are the peer links' (the rendezvous' own few hundred bytes per worker are reported apart).
- diloco over `inproc` (deploy/inproc.py): the coordinator state machine and worker threads; over `grpc`:
  a spawned coordinator process (`bench.transport._serve`) and one spawned `run_grpc_worker` per worker, the
  gRPC star. Every worker evaluates the shared replica at each round start and after the last round; the
  curve is the mean over workers (they hold the same model) and their byte counters at those points.
"""

from __future__ import annotations

import json
import queue
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch.multiprocessing as mp

from bench.transport_rounds import _grpc_worker  # one DiLoCo worker of the gRPC star, one torch thread
from protocols.config import RunConfig, parse_config

# 2 layers, 32 wide, block 32: ~28k parameters (0.11 MB of fp32), small enough that 16 nodes as threads of
# one process on 2 cores train a few hundred steps each in about a minute.
MODEL: dict[str, Any] = {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32}
BATCH = 8
EVAL_BATCHES = 2
MAX_CHARS = 300_000
LR = 1e-2
DILOCO_OUTER = {"outer_lr": 1.0, "outer_momentum": 0.5}  # the repo's tuned dense DiLoCo (BENCHMARKS.md)
PEER_TIMEOUT_S = 600.0  # no node ever gives up on a slow neighbour (2 cores, 16 threads): no skipped messages
TOKEN = "gossip-bench"

# Contender -> its protocol section (None: dense DiLoCo through the coordinator). Every gossip contender
# starts from independent initialisations (Tian et al.'s setting) and takes one gossip step per round.
# The exponential graph is the one-peer exponential graph (time-varying, one message per node per step).
GOSSIP: dict[str, dict[str, Any]] = {
    "ring": {"topology": "ring", "variance_correction": {"enabled": False}},
    "ring-vc": {"topology": "ring", "variance_correction": {"enabled": True}},
    "exponential": {"topology": "one_peer_exponential", "variance_correction": {"enabled": False}},
    "exponential-vc": {"topology": "one_peer_exponential", "variance_correction": {"enabled": True}},
    "epidemic": {"topology": "epidemic", "variance_correction": {"enabled": False}},
    "epidemic-vc": {"topology": "epidemic", "variance_correction": {"enabled": True}},
    # CHOCO-Gossip with top-10% on the ring, consensus step 0.2 (the ChocoConfig defaults); no VC (it would
    # corrupt the x_hat copies).
    "choco-topk": {"topology": "ring", "scheme": "choco", "choco": {"codec": "topk", "density": 0.1, "gamma": 0.2}},
}
CONTENDERS = (*GOSSIP, "diloco")


def twin(contender: str) -> str:
    """The same topology with variance correction flipped: ring-vc <-> ring."""
    return contender.removesuffix("-vc") if contender.endswith("-vc") else f"{contender}-vc"


def run_config(contender: str, nodes: int, steps: int, inner_steps: int, transport: str) -> RunConfig:
    """`contender`'s config: the shared model, data, budget and eval schedule (every round); its protocol."""
    if contender == "diloco":
        protocol: dict[str, Any] = {"kind": "diloco", "inner_steps": inner_steps, **DILOCO_OUTER}
    elif contender in GOSSIP:
        protocol = {"kind": "gossip", "inner_steps": inner_steps, "gossip_steps": 1, "independent_init": True,
                    "peer_timeout_s": PEER_TIMEOUT_S, **GOSSIP[contender]}
    else:
        raise ValueError(f"unknown contender {contender!r}; choose from {', '.join(CONTENDERS)}")
    cluster: dict[str, Any] = {"workers": nodes, "round_deadline_s": 3600, "heartbeat_timeout_s": 3600}
    if transport in ("inproc", "p2p"):
        cluster["transport"] = transport
    if transport == "p2p":
        cluster["token"] = TOKEN
    return parse_config({
        "name": f"gossip-bench-{contender}",
        "model": MODEL,
        "data": {"batch_size": BATCH, "max_chars": MAX_CHARS},
        "train": {"steps": steps, "lr": LR, "warmup_steps": max(1, min(30, steps // 10)),
                  "eval_batches": EVAL_BATCHES, "eval_every_steps": inner_steps},
        "protocol": protocol,
        "cluster": cluster,
    })


@dataclass
class Curve:
    """A run's per-round record; index k = after k completed rounds (k = 0: the initial models)."""

    eval_loss: list[float | None]
    bytes_total_per_worker: list[float]  # cumulative, sent + received, mean over workers
    consensus_distance: list[float | None] = field(default_factory=list)  # after round r (r = 0..R-1)
    final_bytes_total_per_worker: float = 0.0  # the whole run's (leave and final reports included)
    final_bytes_sent_per_worker: float = 0.0  # of which sent
    final_bytes_received_per_worker: float = 0.0  # and received
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def gossip_curve(rows: list[dict[str, Any]], summary: dict[str, Any], seconds: float) -> Curve:
    """From the rendezvous' rows: eval after k rounds is row k's (taken at round k's start; row R the final
    evaluation); bytes after k rounds are row k-1's counters (reported at round k-1's end)."""
    by_round = {r["round"]: r for r in rows}
    total = max(by_round) if by_round else 0
    evals = [by_round[k]["eval_loss"] if k in by_round else None for k in range(total + 1)]
    moved = [0.0] + [float(by_round[k - 1]["bytes_total_per_worker"]) if k - 1 in by_round else float("nan")
                     for k in range(1, total + 1)]
    distances = [by_round[k]["consensus_distance"] if k in by_round else None for k in range(total)]
    keys = ("skipped_messages", "refused_messages", "rendezvous_bytes_total_per_worker")
    extra: dict[str, Any] = {k: summary[k] for k in keys if k in summary}
    return Curve(evals, moved, distances, float(summary["bytes_total_per_worker"]),
                 float(summary["bytes_sent_per_worker"]), float(summary["bytes_received_per_worker"]), seconds, extra)


def diloco_curve(results: list[Any], summary: dict[str, Any] | None, seconds: float) -> Curve:
    """From the workers' eval points ({"round", "eval_loss", "bytes_sent", "bytes_received"}, taken at each
    round start and after the last round): means over workers per round."""
    points: dict[int, list[tuple[float, float]]] = {}
    for result in results:
        for p in result.evals:
            points.setdefault(int(p["round"]), []).append((p["eval_loss"], p["bytes_sent"] + p["bytes_received"]))
    total = max(points) if points else 0
    evals = [sum(e for e, _ in points[k]) / len(points[k]) if k in points else None for k in range(total + 1)]
    moved = [sum(b for _, b in points[k]) / len(points[k]) if k in points else float("nan") for k in range(total + 1)]
    if summary is not None:
        sent, received = float(summary["bytes_sent_per_worker"]), float(summary["bytes_received_per_worker"])
    else:
        n = max(len(results), 1)
        sent, received = sum(r.bytes_sent for r in results) / n, sum(r.bytes_received for r in results) / n
    # One replica, digest-checked every round: the workers' models are identical, distance 0 by construction.
    return Curve(evals, moved, [0.0] * total, sent + received, sent, received, seconds)


def run_inproc(contender: str, nodes: int, steps: int, inner_steps: int) -> Curve:
    from deploy.gossip_inproc import run_inproc_gossip
    from deploy.inproc import run_inproc as run_coordinated

    cfg = run_config(contender, nodes, steps, inner_steps, "inproc")
    began = time.perf_counter()
    if contender == "diloco":
        summary, results = run_coordinated(cfg)
        return diloco_curve(results, summary, time.perf_counter() - began)
    with tempfile.TemporaryDirectory(prefix="gossip-bench-") as tmp:
        summary, _ = run_inproc_gossip(cfg, run_dir=tmp)
        lines = (Path(tmp) / "metrics.jsonl").read_text().splitlines()
    rows = [row for row in map(json.loads, lines) if row.get("event") in ("round", "final")]
    return gossip_curve(rows, summary, time.perf_counter() - began)


# ---- gRPC: spawned processes on loopback ----------------------------------------------------------------
def _p2p_worker(address: str, results: Any) -> None:
    """Spawned: one gossip worker (`lowband worker --join` on a gossip run), one torch thread."""
    from worker.runners import run_p2p_worker

    results.put(run_p2p_worker(address, token=TOKEN, threads=1, retry_for_s=120.0))


def _collect(results: Any, procs: list[Any], count: int, timeout_s: float) -> list[Any]:
    from bench.transport import _collect as collect_items

    box: list[Any] = []
    errors: list[BaseException] = []

    def get() -> None:
        try:
            box.extend(collect_items(results, procs, count))
        except BaseException as err:  # re-raised below
            errors.append(err)

    thread = threading.Thread(target=get, daemon=True)
    thread.start()
    thread.join(timeout_s)
    if errors:
        raise errors[0]
    if thread.is_alive():
        raise TimeoutError(f"{count} workers did not finish in {timeout_s:.0f} s")
    return box


def run_grpc(contender: str, nodes: int, steps: int, inner_steps: int, timeout_s: float = 900.0) -> Curve:
    """Gossip over p2p (rendezvous here, workers spawned) or DiLoCo over the gRPC star (all spawned)."""
    from bench.transport import _finish, _serve

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs: list[Any] = []
    began = time.perf_counter()
    if contender == "diloco":
        cfg = run_config(contender, nodes, steps, inner_steps, "grpc")
        ours, theirs = ctx.Pipe()
        server = ctx.Process(target=_serve, args=(cfg.model_dump(), theirs), name="coordinator", daemon=True)
        server.start()
        procs.append(server)
        try:
            if not ours.poll(120):
                raise RuntimeError(f"the coordinator process reported no address (exit code {server.exitcode})")
            address = ours.recv()
            for i in range(nodes):
                procs.append(ctx.Process(target=_grpc_worker, args=(address, results), name=f"worker{i}", daemon=True))
                procs[-1].start()
            got = _collect(results, procs, nodes, timeout_s)
        finally:
            ours.send("stop")
            _finish(procs)
        return diloco_curve(got, None, time.perf_counter() - began)

    from coordinator.rendezvous_server import RendezvousServer

    cfg = run_config(contender, nodes, steps, inner_steps, "p2p")
    rendezvous = RendezvousServer(cfg).start()
    try:
        for i in range(nodes):
            procs.append(ctx.Process(target=_p2p_worker, args=(rendezvous.address, results), name=f"worker{i}",
                                     daemon=True))
            procs[-1].start()
        _collect(results, procs, nodes, timeout_s)
        rendezvous.wait_finished(60)
        rendezvous.wait_departed(30)
        summary = rendezvous.summary()
        rows = list(rendezvous.rendezvous.rows)
    finally:
        rendezvous.stop()
        _finish(procs)
        try:
            while True:
                results.get_nowait()
        except (queue.Empty, OSError, ValueError):
            pass
    return gossip_curve(rows, summary, time.perf_counter() - began)
