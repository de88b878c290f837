"""Run whole training jobs side by side (same data, same token budget) and turn them into bench rows."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from rich.console import Console

from bench.common import RESULTS
from deploy.launcher import run
from deploy.report import eval_curve
from protocols.config import RunConfig

Curve = list[tuple[float, float]]


def variant(base: RunConfig, name: str, protocol: dict[str, Any]) -> tuple[str, RunConfig]:
    """`base` with another name and protocol section: everything else (model, data, budget) shared."""
    return name, RunConfig.model_validate({**base.model_dump(), "name": name, "protocol": protocol})


def outer_overrides(lr: float | None, momentum: float | None) -> dict[str, float]:
    """Outer-optimizer fields to set on DiLoCo contenders (none: the protocol's paper defaults)."""
    out: dict[str, float] = {}
    if lr is not None:
        out["outer_lr"] = lr
    if momentum is not None:
        out["outer_momentum"] = momentum
    return out


# Byte columns every bench that runs whole jobs reports, per worker (see BENCHMARKS.md).
BYTE_COLUMNS = ["bytes_sent_per_worker", "bytes_received_per_worker", "bytes_total_per_worker"]


def run_all(contenders: list[tuple[str, RunConfig]], console: Console) -> tuple[list[dict[str, Any]], dict[str, Curve]]:
    """Run each contender to completion; rows carry eval loss, tokens, bytes both ways and ratios to the
    first (DDP). `bytes_reduction_vs_ddp` compares totals (sent + received per worker)."""
    rows: list[dict[str, Any]] = []
    curves: dict[str, Curve] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, cfg in contenders:
            console.rule(name)
            cfg = cfg.model_copy(update={"run_dir": tmp})
            s = run(cfg, console=console)
            curves[name] = [(sent, loss) for _, sent, loss in eval_curve(Path(s["run_dir"]), s)]
            rows.append({"contender": name, "eval_loss": s["final_eval_loss"], "tokens": s["tokens"],
                         **{key: s[key] for key in BYTE_COLUMNS}, "resyncs": s.get("resyncs", 0),
                         "wall_s": s["wall_s"], "tokens_per_s": s["tokens"] / s["wall_s"]})
    base = rows[0]
    for r in rows:
        r["loss_vs_ddp"] = r["eval_loss"] / base["eval_loss"]
        r["bytes_reduction_vs_ddp"] = base["bytes_total_per_worker"] / r["bytes_total_per_worker"]
    return rows, curves


def plot_curves(curves: dict[str, Curve], name: str, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, points in curves.items():
        logged = [(x, y) for x, y in points if x > 0]  # the initial state (0 bytes) has no place on a log axis
        if logged:
            xs, ys = zip(*logged, strict=True)
            ax.plot(xs, ys, marker="o", label=label)
    ax.set(xscale="log", xlabel="bytes per worker, sent + received", ylabel="eval loss", title=title)
    ax.legend()
    fig.tight_layout()
    path = RESULTS / f"{name}.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
