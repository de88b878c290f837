"""What a finished run leaves for people: summary.json, loss.png and the final table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def eval_curve(run_dir: Path, summary: dict[str, Any]) -> list[tuple[float, float, float]]:
    """(tokens, bytes per worker both ways, eval loss) points: one per evaluated round, plus the final one.

    A round record's eval loss is of the global state the round started from, so it is placed at the
    tokens and bytes counted before that round (the previous record's totals). Eval events (DDP, the
    all-gather transport) are already taken at the step they name.
    """
    points: list[tuple[float, float, float]] = []
    before = (0.0, 0.0)
    for r in read_metrics(run_dir):
        if r.get("event") == "round":
            if r.get("eval_loss") is not None:
                points.append((before[0], before[1], float(r["eval_loss"])))
            before = (float(r["tokens"]), float(r["bytes_total_per_worker"]))
        elif r.get("event") == "eval" and r.get("eval_loss") is not None:
            points.append((float(r["tokens"]), float(r["bytes_total_per_worker"]), float(r["eval_loss"])))
    if summary.get("final_eval_loss") is not None:
        points.append(
            (float(summary["tokens"]), float(summary["bytes_total_per_worker"]), float(summary["final_eval_loss"]))
        )
    return points


def plot_loss(run_dir: Path, summary: dict[str, Any]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = eval_curve(run_dir, summary)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    if points:
        tokens, sent, loss = zip(*points, strict=True)
        left.plot(tokens, loss, marker="o")
        right.plot(sent, loss, marker="o")
    left.set(xlabel="tokens (all workers)", ylabel="eval loss", title=f"{summary.get('name', '')}: loss vs tokens")
    right.set(xlabel="bytes per worker (sent + received)", ylabel="eval loss", title="loss vs bytes on the wire")
    fig.tight_layout()
    path = run_dir / "loss.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def final_table(summaries: list[dict[str, Any]]) -> Table:
    table = Table(title="lowband: final results (bytes per worker)")
    # Bytes per worker, sent + received (summary.json has each direction); every comparison uses the total.
    columns = ("run", "protocol", "eval loss", "tokens", "bytes", "vs first", "wall")
    for col in columns:
        table.add_column(col, justify="right" if col not in ("run", "protocol") else "left")
    base = summaries[0].get("bytes_total_per_worker") or 0
    for s in summaries:
        total = s.get("bytes_total_per_worker") or 0
        ratio = f"{base / total:.1f}x fewer" if total and s is not summaries[0] and total < base else ""
        if total and s is not summaries[0] and total > base and base:
            ratio = f"{total / base:.1f}x more"
        loss = s.get("final_eval_loss")
        table.add_row(
            s.get("name", ""),
            s.get("protocol", ""),
            f"{loss:.4f}" if loss is not None else "-",
            f"{s.get('tokens', 0) / 1e6:.2f}M",
            human_bytes(total),
            ratio,
            f"{s.get('wall_s', 0):.0f} s",
        )
    return table


def print_final(summaries: list[dict[str, Any]], console: Console | None = None) -> None:
    (console or Console()).print(final_table(summaries))
