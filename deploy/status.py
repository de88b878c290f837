"""`lowband status HOST:PORT`: where a live coordinated run stands, asked over the coordinator's Status RPC.

One row a worker that joined: whether it is alive, its round and inner step, its latest training and eval loss,
its speed (tokens/s in its latest round), the emulated link it reports ('-' when none), and its bytes both ways
as the coordinator counted them, split into protocol, control and initial-state traffic. `--json` prints the
same as one JSON object (losses and speeds that are not known yet are null).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import grpc
from rich.console import Console
from rich.table import Table

from deploy.report import human_bytes
from protocols.config import PROTOCOL_VERSION
from protocols.wire import lowband_pb2_grpc, serde
from protocols.wire import messages as m


def fetch_status(address: str, token: str = "", tls_ca: bytes | None = None, timeout_s: float = 10.0
                 ) -> m.StatusReply:
    """Ask the coordinator at `address` once; a refusal or an unreachable coordinator raises grpc.RpcError."""
    if tls_ca is not None:
        channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=tls_ca),
                                      options=m.GRPC_OPTIONS)
    else:
        channel = grpc.insecure_channel(address, options=m.GRPC_OPTIONS)
    with channel:
        stub = lowband_pb2_grpc.CoordinatorStub(channel)
        request = m.StatusRequest(m.Envelope(run_id="", worker_id="", round=0, protocol_version=PROTOCOL_VERSION,
                                             token=token))
        reply = serde.from_pb(stub.Status(serde.to_pb(request), timeout=timeout_s), m.StatusReply)
    return reply


def _known(value: float) -> float | None:
    return value if math.isfinite(value) else None


def status_dict(reply: m.StatusReply) -> dict[str, Any]:
    """The reply as plain JSON-ready data, each worker with its byte totals besides the split."""
    workers = []
    for w in reply.workers:
        row = dataclasses.asdict(w)
        for key in ("loss", "eval_loss", "tokens_per_s"):
            row[key] = _known(row[key])
        row["link"] = w.link or None
        row["bytes_sent"] = w.protocol_sent + w.control_sent + w.state_sent
        row["bytes_received"] = w.protocol_received + w.control_received + w.state_received
        workers.append(row)
    return {"run_id": reply.run_id, "name": reply.name, "protocol": reply.protocol, "phase": reply.phase.value,
            "round": reply.round, "rounds": reply.rounds_total, "workers": workers}


def status_table(status: dict[str, Any]) -> Table:
    table = Table(title=f"{status['name']} ({status['protocol']}, run {status['run_id']}): round "
                        f"{status['round']}/{status['rounds']}, {status['phase']}")
    columns = ("worker", "host", "alive", "round", "step", "loss", "eval loss", "tokens/s", "link",
               "sent", "received", "protocol sent / recv", "control sent / recv", "state sent / recv", "seen")
    for col in columns:
        table.add_column(col, justify="left" if col in ("worker", "host", "link") else "right")

    def num(value: float | None, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    for w in status["workers"]:
        table.add_row(
            w["worker_id"], w["hostname"], "yes" if w["alive"] else "no", str(w["round"]), str(w["inner_step"]),
            num(w["loss"], ".4f"), num(w["eval_loss"], ".4f"), num(w["tokens_per_s"], ".0f"), w["link"] or "-",
            human_bytes(w["bytes_sent"]), human_bytes(w["bytes_received"]),
            f"{human_bytes(w['protocol_sent'])} / {human_bytes(w['protocol_received'])}",
            f"{human_bytes(w['control_sent'])} / {human_bytes(w['control_received'])}",
            f"{human_bytes(w['state_sent'])} / {human_bytes(w['state_received'])}",
            f"{w['last_seen_s']:.0f} s ago",
        )
    return table


def cmd_status(args: argparse.Namespace, console: Console) -> int:
    ca = Path(args.tls_ca).read_bytes() if args.tls_ca else None
    try:
        status = status_dict(fetch_status(args.address, args.token, ca, args.timeout))
    except grpc.RpcError as err:
        if err.code() is not grpc.StatusCode.UNIMPLEMENTED:
            raise  # the CLI prints the coordinator's own words (UNAUTHENTICATED: bad token, UNAVAILABLE, ...)
        console.print(f"[red]error:[/red] {args.address} serves no Status call: it is a gossip run's rendezvous "
                      f"or a coordinator older than `lowband status`", highlight=False)
        return 1
    if args.json:
        console.print(json.dumps(status, indent=2), markup=False, highlight=False, soft_wrap=True)
    else:
        console.print(status_table(status))
    return 0


def add_parser(sub: Any) -> None:
    """`lowband status`'s arguments, on the CLI's subcommand parsers."""
    p = sub.add_parser("status", help="show a live coordinated run: its workers, their progress and traffic")
    p.add_argument("address", metavar="HOST:PORT", help="the coordinator's address")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--token", default="", help="the run's shared secret (required when the run has one)")
    p.add_argument("--tls-ca", default=None, help="PEM root certificate to verify the coordinator (enables TLS)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the coordinator's answer")
    p.set_defaults(func=cmd_status)
