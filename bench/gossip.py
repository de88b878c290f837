"""Decentralized gossip averaging, with and without variance correction, against DiLoCo: rounds and bytes
to reach DiLoCo's eval loss, every contender side by side in one invocation, same token budget.

    python -m bench.gossip [--quick] [--nodes 16] [--grpc-nodes 4] [--steps 400] [--inner-steps 10]
                           [--contenders ring,ring-vc,...] [--grpc-contenders auto] [--out gossip]

Run it inside a loopback-only namespace: `deploy/loopback.sh .venv/bin/python -m bench.gossip`.

Every contender trains the same tiny GPT (bench/gossip_runs.py: 2 layers, 32 wide, batch 8 x 32 characters)
for `--steps` inner AdamW steps per worker (the token budget) in rounds of `--inner-steps` (H), and is
evaluated at every round on the same 2 fixed eval batches. Contenders (bench/gossip_runs.py):

- ring, ring-vc: gossip averaging on the ring (Metropolis-Hastings weights), without / with the variance
  correction of Tian et al. (arXiv:2404.04616). exponential, exponential-vc: the *one-peer* exponential
  graph (Ying et al. 2021: time-varying, node i averages with i + 2^(t mod log2 n), one message per node per
  step), not the static exponential graph. epidemic, epidemic-vc: Epidemic Learning (each node pushes to
  ceil(log2 n) random peers per step). choco-topk: CHOCO-Gossip on the ring with top-10% compression and
  consensus step 0.2 (no variance correction: it would corrupt the x_hat copies). Every gossip contender
  takes one gossip step per round and starts from independent initialisations (`independent_init: true`,
  the setting of Tian et al.); there is no aggregator and no outer step.
- diloco: dense DiLoCo through the coordinator (outer SGD lr 1.0, Nesterov momentum 0.5); one shared
  initial model, inherent to the protocol.

Two parts: `--nodes` (16) nodes over `inproc` (every contender; threads of this process), then
`--grpc-nodes` (4) nodes over gRPC, real processes on loopback: gossip over the p2p Peer service (a
rendezvous here, one spawned `run_p2p_worker` process per node), DiLoCo over the gRPC star (a coordinator
process and `run_grpc_worker` processes). The gRPC part runs diloco, the best variance-corrected topology of
the inproc part and its plain twin (`--grpc-contenders auto`).

Measurement. Eval loss after k rounds (k = 0..R): for gossip, the rendezvous' metrics row of round k: the
mean over the workers of each worker's *own* model's eval loss, taken at the start of round k (row R: each
worker's final model); there is no global model, and this is not the loss of the averaged model. For
DiLoCo, the shared replica's eval loss at the start of round k (mean over the workers, who all hold it).
`bytes_sent_per_worker` / `bytes_received_per_worker` / `bytes_total_per_worker` are the whole run's bytes per
worker, each way and both; `bytes_to_target_per_worker` the cumulative bytes per worker after
`rounds_to_target` rounds.

Target. At each (nodes, transport), `target_eval_loss` is DiLoCo's final eval loss (after all R rounds).
`rounds_to_target` is the smallest k with eval loss after k rounds <= the target (None: never within R
rounds); for diloco itself that is the first round its curve reaches its own final loss (<= R, often R, less
when its curve had dipped there earlier). The issue's target: at `--nodes` inproc, the best
variance-corrected topology (fewest rounds to target) needs at most 1.2 x DiLoCo's rounds_to_target;
`target` in the JSON records the numbers and pass/fail (nothing here is tuned to make it pass).

Writes bench/results/<out>.json and <out>.png (eval loss and consensus distance against round, `--nodes`).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.common import RESULTS, command_line, write_result
from bench.gossip_runs import BATCH, CONTENDERS, EVAL_BATCHES, GOSSIP, MODEL, Curve, run_grpc, run_inproc, twin

RATIO_TARGET = 1.2  # best VC topology's rounds to DiLoCo's loss, at most this times DiLoCo's
COLUMNS = ["contender", "nodes", "transport", "rounds", "rounds_to_target", "rounds_to_target_vs_diloco",
           "target_eval_loss", "final_eval_loss", "bytes_to_target_per_worker", "bytes_sent_per_worker",
           "bytes_received_per_worker", "bytes_total_per_worker", "consensus_distance_final", "seconds"]


@dataclass
class Grid:
    """What one invocation runs (see the module docstring)."""

    nodes: int = 16
    grpc_nodes: int = 4  # 0: no gRPC part
    steps: int = 400
    inner_steps: int = 10
    contenders: list[str] = field(default_factory=lambda: list(CONTENDERS))
    grpc_contenders: list[str] | None = None  # None: diloco, the best VC topology and its twin


QUICK = Grid(nodes=4, grpc_nodes=4, steps=24, inner_steps=4)


def rounds_to(curve: list[float | None], target: float) -> int | None:
    """The smallest k with curve[k] <= target (curve[k]: eval loss after k rounds); None if never."""
    for k, loss in enumerate(curve):
        if loss is not None and loss <= target:
            return k
    return None


def row_of(contender: str, nodes: int, transport: str, grid: Grid, curve: Curve) -> dict[str, Any]:
    distances = [d for d in curve.consensus_distance if d is not None]
    evals = curve.eval_loss
    return {
        "contender": contender, "nodes": nodes, "transport": transport,
        "rounds": len(evals) - 1, "steps_per_worker": grid.steps, "inner_steps": grid.inner_steps,
        "target_eval_loss": None, "rounds_to_target": None, "rounds_to_target_vs_diloco": None,
        "bytes_to_target_per_worker": None,
        "bytes_sent_per_worker": curve.final_bytes_sent_per_worker,
        "bytes_received_per_worker": curve.final_bytes_received_per_worker,
        "bytes_total_per_worker": curve.final_bytes_total_per_worker,
        "initial_eval_loss": evals[0], "final_eval_loss": evals[-1],
        "min_eval_loss": min((e for e in evals if e is not None), default=None),
        "consensus_distance_first": distances[0] if distances else None,
        "consensus_distance_final": distances[-1] if distances else None,
        "seconds": curve.seconds,
        "eval_loss_curve": evals,
        "bytes_curve": curve.bytes_total_per_worker,
        "consensus_distance_curve": curve.consensus_distance,
        **curve.extra,
    }


def score(rows: list[dict[str, Any]]) -> None:
    """Fill target_eval_loss, rounds_to_target (+ vs diloco) and bytes_to_target from each group's diloco."""
    for nodes, transport in {(r["nodes"], r["transport"]) for r in rows}:
        group = [r for r in rows if r["nodes"] == nodes and r["transport"] in _same_part(transport)]
        diloco = next((r for r in group if r["contender"] == "diloco"), None)
        if diloco is None or diloco["final_eval_loss"] is None:
            continue
        target = diloco["final_eval_loss"]
        base = rounds_to(diloco["eval_loss_curve"], target)
        for r in group:
            k = rounds_to(r["eval_loss_curve"], target)
            r.update(target_eval_loss=target, rounds_to_target=k,
                     bytes_to_target_per_worker=r["bytes_curve"][k] if k is not None else None,
                     rounds_to_target_vs_diloco=k / base if k is not None and base else None)


def _same_part(transport: str) -> tuple[str, ...]:
    """The transports of one part: inproc, or gRPC (p2p gossip + the gRPC star)."""
    return ("inproc",) if transport == "inproc" else ("p2p", "grpc")


def best_vc(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The variance-corrected row with the fewest rounds to target (ties and never-reached: lowest final loss)."""
    vc = [r for r in rows if r["contender"].endswith("-vc") and r["final_eval_loss"] is not None]
    if not vc:
        return None
    return min(vc, key=lambda r: (r["rounds_to_target"] is None, r["rounds_to_target"] or 0, r["final_eval_loss"]))


def verdict(rows: list[dict[str, Any]], nodes: int) -> dict[str, Any]:
    part = [r for r in rows if r["nodes"] == nodes and r["transport"] == "inproc"]
    diloco = next((r for r in part if r["contender"] == "diloco"), None)
    best = best_vc(part)
    if diloco is None or best is None:
        return {"checked": False, "why": "needs diloco and a -vc contender at the inproc part"}
    ratio = best["rounds_to_target_vs_diloco"]
    return {
        "checked": True, "nodes": nodes, "transport": "inproc",
        "statement": f"with variance correction, the best topology reaches DiLoCo's final eval loss in at most "
                     f"{RATIO_TARGET}x DiLoCo's rounds_to_target",
        "target_eval_loss": diloco["final_eval_loss"],
        "diloco_rounds_to_target": diloco["rounds_to_target"],
        "best_vc_contender": best["contender"],
        "best_vc_rounds_to_target": best["rounds_to_target"],
        "best_vc_final_eval_loss": best["final_eval_loss"],
        "ratio": ratio, "max_ratio": RATIO_TARGET,
        "passed": ratio is not None and ratio <= RATIO_TARGET,
    }


def collect(grid: Grid, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every contender of `grid`; the result document (rows, target, notes), without writing it."""
    unknown = [c for c in grid.contenders + (grid.grpc_contenders or []) if c not in CONTENDERS]
    if unknown:
        raise ValueError(f"unknown contenders {unknown}; choose from {', '.join(CONTENDERS)}")
    began = time.perf_counter()
    rows: list[dict[str, Any]] = []
    # diloco first: it defines the target.
    for contender in sorted(grid.contenders, key=lambda c: c != "diloco"):
        log(f"[{time.perf_counter() - began:6.0f}s] {contender}: {grid.nodes} nodes over inproc")
        curve = run_inproc(contender, grid.nodes, grid.steps, grid.inner_steps)
        transport = "inproc"
        rows.append(row_of(contender, grid.nodes, transport, grid, curve))
        log(f"    final eval {curve.eval_loss[-1]:.4f}, {curve.final_bytes_total_per_worker:.3g} B/worker, "
            f"{curve.seconds:.0f}s")
    score(rows)
    grpc = grid.grpc_contenders
    if grpc is None:
        best = best_vc(rows)
        grpc = ["diloco"] + ([best["contender"], twin(best["contender"])] if best is not None else [])
    if grid.grpc_nodes:
        for contender in sorted(grpc, key=lambda c: c != "diloco"):
            transport = "grpc" if contender == "diloco" else "p2p"
            log(f"[{time.perf_counter() - began:6.0f}s] {contender}: {grid.grpc_nodes} nodes over {transport}")
            curve = run_grpc(contender, grid.grpc_nodes, grid.steps, grid.inner_steps)
            rows.append(row_of(contender, grid.grpc_nodes, transport, grid, curve))
            log(f"    final eval {curve.eval_loss[-1]:.4f}, {curve.final_bytes_total_per_worker:.3g} B/worker, "
                f"{curve.seconds:.0f}s")
        score(rows)
    return {
        "grid": asdict(grid) | {"grpc_contenders": grpc if grid.grpc_nodes else []},
        "model": MODEL, "batch_size": BATCH, "eval_batches": EVAL_BATCHES,
        "gossip_settings": GOSSIP,
        "target": verdict(rows, grid.nodes),
        "wall_s": time.perf_counter() - began,
        "notes": [
            "eval loss (gossip): the rendezvous' per-round row, the mean over workers of each worker's own "
            "model's eval loss at the round's start (row R: final models); not the averaged model's loss",
            "eval loss (diloco): the shared replica's, at each round start and after the last round",
            "index k of eval_loss_curve / bytes_curve = after k completed rounds; consensus_distance_curve[r] = "
            "after round r, estimated from random-projection sketches (diloco: 0, one shared replica)",
            "target_eval_loss = diloco's final eval loss at the same nodes and transport part; rounds_to_target = "
            "first k with eval loss <= target (diloco: first round reaching its own final loss)",
            "exponential = one_peer_exponential (time-varying), not the static exponential graph",
            "gossip: independent_init true, gossip_steps 1, scheme average (choco-topk: CHOCO, top-10%, gamma 0.2)",
            "bytes_total_per_worker: whole run, sent + received, peer links (p2p) or coordinator links (diloco)",
        ],
        "rows": rows,
    }


def plot(doc: dict[str, Any], path: Path) -> Path:
    """Eval loss against round per contender and consensus distance against round, at the inproc part."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nodes = doc["grid"]["nodes"]
    rows = [r for r in doc["rows"] if r["nodes"] == nodes and r["transport"] == "inproc"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = {c: f"C{i}" for i, c in enumerate(CONTENDERS)}
    for r in rows:
        color = colors.get(r["contender"], "black")
        style = "--" if r["contender"] == "diloco" else ("-" if r["contender"].endswith("-vc") else ":")
        ks = [k for k, e in enumerate(r["eval_loss_curve"]) if e is not None]
        left.plot(ks, [r["eval_loss_curve"][k] for k in ks], style, color=color, label=r["contender"])
        ds = [(k + 1, d) for k, d in enumerate(r["consensus_distance_curve"]) if d is not None and d > 0]
        if ds and r["contender"] != "diloco":
            right.plot(*zip(*ds, strict=True), style, color=color, label=r["contender"])
    target = doc["target"].get("target_eval_loss")
    if target is not None:
        left.axhline(target, color="grey", linewidth=0.8, label="target (diloco final)")
    left.set(xlabel="round", ylabel="eval loss (mean of own models)", title=f"{nodes} nodes, inproc")
    finals = [r["final_eval_loss"] for r in rows if r["final_eval_loss"] is not None]
    if finals:
        left.set_ylim(min(finals) - 0.1, max(max(finals) + 0.6, min(finals) + 1.0))
    right.set(xlabel="round", ylabel="consensus distance", yscale="log", title="consensus distance after the round")
    left.legend(fontsize=7)
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.gossip",
        description="Gossip (ring, one-peer exponential, epidemic; each with and without variance correction; "
                    "CHOCO top-k) against DiLoCo: rounds and bytes per worker to reach DiLoCo's final eval loss "
                    "at the same token budget, at --nodes over inproc and --grpc-nodes over gRPC. Run inside "
                    "deploy/loopback.sh. Writes bench/results/<out>.json and <out>.png.",
    )
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: 4 nodes, 24 steps of H=4, gRPC part included (about a minute)")
    parser.add_argument("--nodes", type=int, default=None, help="nodes of the inproc part (default 16)")
    parser.add_argument("--grpc-nodes", type=int, default=None, help="nodes of the gRPC part; 0 skips it (default 4)")
    parser.add_argument("--steps", type=int, default=None, help="inner steps per worker: the token budget (400)")
    parser.add_argument("--inner-steps", type=int, default=None, help="H, inner steps per round (10)")
    parser.add_argument("--contenders", default=None,
                        help=f"comma-separated, of {','.join(CONTENDERS)} (default: all)")
    parser.add_argument("--grpc-contenders", default="auto",
                        help="comma-separated contenders of the gRPC part; auto: diloco, the best -vc topology "
                             "of the inproc part and its plain twin")
    parser.add_argument("--out", default=None, help="result name under bench/results (default gossip, "
                                                    "gossip_quick with --quick)")
    args = parser.parse_args(argv)
    grid = Grid(**asdict(QUICK)) if args.quick else Grid()
    for name in ("nodes", "grpc_nodes", "steps", "inner_steps"):
        if getattr(args, name) is not None:
            setattr(grid, name, getattr(args, name))
    if args.contenders:
        grid.contenders = _names(args.contenders)
    if args.grpc_contenders != "auto":
        grid.grpc_contenders = _names(args.grpc_contenders)
    if grid.steps < grid.inner_steps or grid.nodes < 2:
        parser.error("need --steps >= --inner-steps and --nodes >= 2")
    out = args.out or ("gossip_quick" if args.quick else "gossip")
    doc = collect(grid)
    rows = doc.pop("rows")
    path = write_result(out, command_line("bench.gossip"), rows, COLUMNS, **doc)
    print(plot({**doc, "rows": rows}, RESULTS / f"{out}.png"))
    t = doc["target"]
    if t.get("checked"):
        print(f"target: {t['best_vc_contender']} {t['best_vc_rounds_to_target']} rounds vs diloco "
              f"{t['diloco_rounds_to_target']} (ratio {t['ratio']}, max {RATIO_TARGET}): "
              f"{'PASS' if t['passed'] else 'FAIL'}")
    print(f"wall {doc['wall_s']:.0f} s; {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

