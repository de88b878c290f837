"""The reply to a Status call (`lowband status HOST:PORT`): the run and every worker, as the state machine holds
them. The servicer's Status method only converts the wire messages and hands over here.

A worker's speed is its latest round's tokens over that round's wall seconds (the span its update reported); its
link is the emulated link its updates name (worker/transports/link.py adds the metrics below), "" when none.
"""

from __future__ import annotations

import math

from coordinator.errors import Code, Rejected
from coordinator.membership import Member
from coordinator.state import CoordinatorState, Phase
from protocols.config import PROTOCOL_VERSION
from protocols.wire import messages as m

_PHASE = {
    Phase.WAITING: m.Phase.WAITING_FOR_WORKERS,
    Phase.TRAINING: m.Phase.TRAINING,
    Phase.FINISHED: m.Phase.FINISHED,
}
# Metric names a worker behind an emulated link reports with every update (worker/transports/link.py).
LINK_BANDWIDTH_METRIC = "link_bandwidth_mbps"
LINK_LATENCY_METRIC = "link_latency_ms"


def status_reply(state: CoordinatorState, request: m.StatusRequest) -> m.StatusReply:
    """Where the run stands. Refused (UNAUTHENTICATED) without the run's token, when it has one (with worker
    tokens only: without one of them; coordinator/sessions.py)."""
    env = request.envelope
    state.gate.check_operator(env.token)
    if env.protocol_version != PROTOCOL_VERSION:
        raise Rejected(Code.FAILED_PRECONDITION, f"protocol version {env.protocol_version} is not supported "
                                                 f"(coordinator speaks {PROTOCOL_VERSION})")
    if env.run_id and env.run_id != state.run_id:
        raise Rejected(Code.FAILED_PRECONDITION, f"wrong run id {env.run_id!r} (this run is {state.run_id!r})")
    now = state.clock()
    members = sorted(state.members_copy(), key=lambda member: member.index)
    return m.StatusReply(
        run_id=state.run_id,
        name=state.cfg.name,
        protocol=state.cfg.protocol.kind,
        phase=_PHASE[state.phase],
        round=state.round,
        rounds_total=state.total_rounds,
        workers=tuple(worker_status(member, now) for member in members),
    )


def _or_nan(value: float | None) -> float:
    return float("nan") if value is None else value


def tokens_per_s(metrics: dict[str, float]) -> float | None:
    """A round's tokens over its wall seconds; None when the update reported no span."""
    wall = metrics.get("wall_s")
    return metrics.get("tokens", 0.0) / wall if wall else None


def link_name(metrics: dict[str, float]) -> str:
    """The emulated link an update named, e.g. "10 Mbit/s, 50 ms"; "" when it named none."""
    if LINK_BANDWIDTH_METRIC not in metrics:
        return ""
    latency = metrics.get(LINK_LATENCY_METRIC, 0.0)
    return f"{metrics[LINK_BANDWIDTH_METRIC]:g} Mbit/s, {latency:g} ms"


def worker_status(member: Member, now: float) -> m.WorkerStatus:
    speed = tokens_per_s(member.last_metrics)
    return m.WorkerStatus(
        worker_id=member.worker_id,
        hostname=member.hostname,
        alive=member.alive,
        round=member.round,
        inner_step=member.step,
        loss=_or_nan(member.loss),
        eval_loss=_or_nan(member.eval_loss),
        tokens=member.tokens,
        tokens_per_s=_or_nan(speed if speed is not None and math.isfinite(speed) else None),
        link=link_name(member.last_metrics),
        resyncs=member.resyncs,
        last_seen_s=0.0 if member.calls_open else max(0.0, now - member.last_seen),  # a call open: heard now
        protocol_sent=member.protocol_sent,
        protocol_received=member.protocol_received,
        control_sent=member.control_sent,
        control_received=member.control_received,
        state_sent=member.state_sent,
        state_received=member.state_received,
    )
