"""What a finished run leaves for people: summary.json, loss.png and the final table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from coordinator.traffic import TRAFFIC_KEYS


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


def _two_panels(width: float) -> tuple[Any, Any, Any]:
    """A figure of two side-by-side panels, drawn off-screen: (figure, left axes, right axes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(width, 4))
    return fig, left, right


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_loss(run_dir: Path, summary: dict[str, Any]) -> Path:
    points = eval_curve(run_dir, summary)
    fig, left, right = _two_panels(10)
    if points:
        tokens, sent, loss = zip(*points, strict=True)
        left.plot(tokens, loss, marker="o")
        right.plot(sent, loss, marker="o")
    left.set(xlabel="tokens (all workers)", ylabel="eval loss", title=f"{summary.get('name', '')}: loss vs tokens")
    right.set(xlabel="bytes per worker (sent + received)", ylabel="eval loss", title="loss vs bytes on the wire")
    return _save(fig, run_dir / "loss.png")


def compare_curves(summaries: list[dict[str, Any]]) -> dict[str, list[tuple[float, float, float]]]:
    """Each run's (tokens, bytes per worker, eval loss) points (`eval_curve`), by "name (protocol)"; runs without
    a single evaluation are left out."""
    curves = {}
    for summary in summaries:
        points = eval_curve(Path(summary["run_dir"]), summary)
        if points:
            curves[f"{summary.get('name', '')} ({summary.get('protocol', '')})"] = points
    return curves


def plot_compare(summaries: list[dict[str, Any]], out: Path) -> Path:
    """compare.png: every run's eval-loss curve in one figure, against tokens (the budget the runs share: a DDP
    baseline has steps, not rounds) and against bytes per worker both ways (log scale: protocols differ by orders
    of magnitude). Each summary names its directory (`run_dir`), whose metrics.jsonl holds its curve."""
    fig, left, right = _two_panels(11)
    for label, points in compare_curves(summaries).items():
        tokens, moved, loss = zip(*points, strict=True)
        left.plot(tokens, loss, marker="o", label=label)
        right.plot([max(b, 1.0) for b in moved], loss, marker="o", label=label)
    left.set(xlabel="tokens (all workers)", ylabel="eval loss", title="loss vs tokens")
    right.set(xlabel="bytes per worker (sent + received)", ylabel="eval loss", title="loss vs bytes on the wire")
    right.set_xscale("log")
    for axes in (left, right):
        if axes.get_lines():
            axes.legend(fontsize="small")
    return _save(fig, out)


def span_rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row a round from the workers' own spans (`WorkerResult.spans`), shaped like a coordinator's
    round record: means over the workers, and each worker's utilization."""
    by_round: dict[int, dict[str, dict[str, float]]] = {}
    for i, result in enumerate(results):
        for span in result.get("spans", []):
            by_round.setdefault(int(span["round"]), {})[str(result.get("worker_id") or f"rank{i}")] = span
    rows = []
    for round_, spans in sorted(by_round.items()):
        def mean(key: str, spans: dict[str, dict[str, float]] = spans) -> float:
            return sum(s[key] for s in spans.values()) / len(spans)

        rows.append({"round": round_, "wall_s": mean("wall_s"), "compute_s": mean("compute_s"),
                     "blocked_s": mean("blocked_s"), "comm_s": mean("comm_s"),
                     "compute_utilization": mean("utilization"),
                     "utilization_per_worker": {w: s["utilization"] for w, s in sorted(spans.items())}})
    return rows


def utilization_rows(run_dir: Path) -> list[dict[str, Any]]:
    """The rounds of metrics.jsonl that carry span times: coordinator "round" rows, or all-gather "timing"."""
    return [r for r in read_metrics(run_dir)
            if r.get("event") in ("round", "timing") and r.get("compute_utilization") is not None]


def plot_utilization(run_dir: Path) -> Path | None:
    """utilization.png: each worker's compute utilization (compute / wall) by round, and the mean seconds of
    a round split into compute, blocked on the exchange, and the rest. None when no round has span times
    (DDP, or a run whose workers reported none)."""
    rows = utilization_rows(run_dir)
    if not rows:
        return None
    rounds = [r["round"] for r in rows]
    fig, left, right = _two_panels(11)
    workers = sorted({w for r in rows for w in r.get("utilization_per_worker", {})})
    for w in workers:
        points = [(r["round"], r["utilization_per_worker"][w]) for r in rows
                  if w in r.get("utilization_per_worker", {})]
        left.plot(*zip(*points, strict=True), marker=".", label=w, alpha=0.7)
    left.plot(rounds, [r["compute_utilization"] for r in rows], color="black", linewidth=2, label="mean")
    left.set(xlabel="round", ylabel="compute / wall", ylim=(0, 1.05), title="compute utilization per round")
    left.legend(fontsize="small")
    compute = [r["compute_s"] for r in rows]
    blocked = [r["blocked_s"] for r in rows]
    rest = [max(r["wall_s"] - r["compute_s"] - r["blocked_s"], 0.0) for r in rows]
    right.bar(rounds, compute, label="compute")
    right.bar(rounds, blocked, bottom=compute, label="blocked on the exchange")
    right.bar(rounds, rest, bottom=[c + b for c, b in zip(compute, blocked, strict=True)], label="other")
    right.set(xlabel="round", ylabel="seconds (mean over workers)", title="where a round's time went")
    right.legend(fontsize="small")
    return _save(fig, run_dir / "utilization.png")


def consensus_rows(run_dir: Path) -> list[dict[str, Any]]:
    """The gossip rounds of metrics.jsonl (rows the rendezvous wrote: they carry `consensus_distance`)."""
    return [r for r in read_metrics(run_dir) if r.get("event") == "round" and "consensus_distance" in r]


def plot_consensus(run_dir: Path) -> Path | None:
    """consensus.png for a gossip run: the consensus distance by round (estimated from the workers'
    sketches, log scale: gossip shrinks it geometrically between bursts of local training) and each
    worker's training loss by round. None when metrics.jsonl has no gossip rounds."""
    rows = consensus_rows(run_dir)
    if not rows:
        return None
    fig, left, right = _two_panels(11)
    points = [(r["round"], r["consensus_distance"]) for r in rows if r["consensus_distance"]]
    if points:
        left.plot(*zip(*points, strict=True), marker="o")
        left.set_yscale("log")
    left.set(xlabel="round", ylabel="consensus distance", title="models' distance to their average")
    for w in sorted({w for r in rows for w in r.get("loss_per_worker", {})}):
        losses = [(r["round"], r["loss_per_worker"][w]) for r in rows if w in r.get("loss_per_worker", {})]
        right.plot(*zip(*losses, strict=True), marker=".", label=w, alpha=0.7)
    right.set(xlabel="round", ylabel="train loss", title="each worker's training loss")
    if len(right.get_lines()) <= 16:
        right.legend(fontsize="small")
    return _save(fig, run_dir / "consensus.png")


def round_line(record: dict[str, Any], rounds: int) -> str:
    """One closed round as a plain line, for logs and output that is not a terminal."""
    def num(key: str, fmt: str) -> str:
        value = record.get(key)
        return "-" if value is None else format(value, fmt)

    return (f"round {record['round'] + 1}/{rounds} closed ({record['closed_by']}): {len(record['workers'])} workers, "
            f"train loss {num('train_loss', '.4f')}, eval loss {num('eval_loss', '.4f')}, "
            f"{human_bytes(record['bytes_sent_per_worker'])} sent and "
            f"{human_bytes(record['bytes_received_per_worker'])} received per worker so far, "
            f"utilization {num('compute_utilization', '.2f')}, {record['seconds']:.1f} s")


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def traffic_split(summary: dict[str, Any]) -> dict[str, float]:
    """A summary's bytes per worker by kind and direction (coordinator/traffic.py's keys). A summary without a
    split (DDP: every byte is the all-reduce) counts all of its bytes as protocol bytes."""
    split = summary.get("traffic_per_worker")
    if split:
        return {key: float(split.get(key, 0.0)) for key in TRAFFIC_KEYS}
    return {key: 0.0 for key in TRAFFIC_KEYS} | {
        "protocol_sent": float(summary.get("bytes_sent_per_worker") or 0.0),
        "protocol_received": float(summary.get("bytes_received_per_worker") or 0.0)}


def _both_ways(sent: float, received: float) -> str:
    return f"{human_bytes(sent)} / {human_bytes(received)}"


def final_table(summaries: list[dict[str, Any]]) -> Table:
    """One row a run. Bytes are per worker, "sent / received", split into the protocol's own traffic (updates up,
    aggregates down), control traffic (joins, heartbeats, waits, ...) and the initial state (the one-time upload
    and whole-replica pulls); "vs first" compares protocol bytes, both ways, with the first run's."""
    table = Table(title="lowband: final results (bytes per worker, sent / received)")
    columns = ("run", "protocol", "eval loss", "tokens", "protocol bytes", "control", "initial state", "total",
               "vs first", "wall")
    for col in columns:
        table.add_column(col, justify="right" if col not in ("run", "protocol") else "left")
    first = traffic_split(summaries[0])
    base = first["protocol_sent"] + first["protocol_received"]
    for s in summaries:
        split = traffic_split(s)
        moved = split["protocol_sent"] + split["protocol_received"]
        ratio = ""
        if s is not summaries[0] and moved and base and moved != base:
            ratio = f"{base / moved:.1f}x fewer" if moved < base else f"{moved / base:.1f}x more"
        loss = s.get("final_eval_loss")
        table.add_row(
            s.get("name", ""),
            s.get("protocol", ""),
            f"{loss:.4f}" if loss is not None else "-",
            f"{s.get('tokens', 0) / 1e6:.2f}M",
            _both_ways(split["protocol_sent"], split["protocol_received"]),
            _both_ways(split["control_sent"], split["control_received"]),
            _both_ways(split["state_sent"], split["state_received"]),
            _both_ways(s.get("bytes_sent_per_worker") or 0.0, s.get("bytes_received_per_worker") or 0.0),
            ratio,
            f"{s.get('wall_s', 0):.0f} s",
        )
    return table


def print_final(summaries: list[dict[str, Any]], console: Console | None = None) -> None:
    (console or Console()).print(final_table(summaries))
