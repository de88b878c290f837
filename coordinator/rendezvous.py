"""The rendezvous of a gossip run: membership, addresses, and the per-round metrics; never a tensor.

Gossip has no aggregator (protocols/gossip): workers mix models with their graph neighbours directly. The
coordinator's part shrinks to telling each worker its index and where its peers listen (`join`, `roster`),
noticing who left or went silent (`leave`, `heartbeat`, `tick`), and turning the workers' per-round
reports into metrics.jsonl rows (`report`). The gRPC service (coordinator/rendezvous_server.py) and the
in-process hub (worker/transports/peers_inproc.py) both drive this one object; every public method takes
one lock and anything refused raises `Rejected`, leaving the state as it was.

Rows: when every live worker has reported round r, or a later one (rounds close in order), one row is
appended:
{"event": "round", "round", "workers", "train_loss", "eval_loss", "loss_per_worker", "eval_loss_per_worker",
"consensus_distance", "tokens", "bytes_sent_per_worker", "bytes_received_per_worker",
"bytes_total_per_worker", "seconds"}. A report for round R (= the run's round count) is a worker's final
evaluation; its row has event "final". `eval_loss` is the mean over the workers that evaluated of each
one's own model at the round's start (there is no global model). Bytes and tokens are the workers' own
cumulative counters, per worker averaged over every worker that joined (as the coordinator's rows are).
The consensus distance is estimated from the random-projection sketches the workers report
(protocols/gossip/sketch.py).
"""

from __future__ import annotations

import dataclasses
import math
import secrets
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from coordinator.base_attest import attested_base
from coordinator.checkpoint import redacted
from coordinator.errors import Code, Rejected
from coordinator.rendezvous_rows import COUNTERS, Peer, check_metrics, round_row
from coordinator.rundir import RunDir
from coordinator.sessions import SESSION_BYTES, Gate, new_session
from protocols.config import PROTOCOL_VERSION, RunConfig, to_yaml
from protocols.gossip.roster import Roster


@dataclasses.dataclass(frozen=True)
class Joined:
    """What a worker learns by joining: its id, its index (join order: its shard, its place in the graph),
    the run's id and the resolved config; its session (every later call to the rendezvous carries it) and
    the run's peer token (every Gossip message carries it: the run's own token never goes to a peer)."""

    worker_id: str
    index: int
    run_id: str
    config_yaml: str
    session: str = ""
    peer_token: str = ""


class Rendezvous:
    def __init__(self, cfg: RunConfig, run_id: str | None = None, run_dir: str | Path | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg, self.clock = cfg, clock
        self.run_id = run_id or uuid.uuid4().hex[:12]
        self.config_yaml = to_yaml(redacted(cfg))  # workers have their token: never send it
        # The run's token joins (Enroll), a per-member session authenticates every later call
        # (coordinator/sessions.py), and peers authenticate each other's messages by `peer_token`, a random
        # secret of this rendezvous' own, handed to members only: the peer links carry no TLS, so the run's
        # token must not travel on them. A run without a token authenticates nothing, peers included.
        self.gate = Gate(cfg.cluster.token, who="rendezvous")
        self.peer_token = secrets.token_urlsafe(SESSION_BYTES) if cfg.cluster.token else ""
        self.total_rounds = cfg.rounds
        self.run_dir = RunDir(run_dir, cfg) if run_dir is not None else None
        self.members: dict[str, Peer] = {}
        self.rows: list[dict[str, Any]] = []
        self.next_row = 0  # the lowest round (R: the final report) without a row yet
        self._reports: dict[int, dict[str, dict[str, float]]] = {}
        self._row_at = self.started = clock()
        self._cond = threading.Condition()
        self.base_digest = ""  # of the frozen base under adapters: the first one attested (coordinator/base_attest.py)

    # ---- membership ----------------------------------------------------------------------------
    def join(self, hostname: str, token: str, protocol_version: int, address: str, worker_name: str = "") -> Joined:
        """A worker's index (join order) and the run; a known `worker_name` rejoins under its old index (with a
        new session: the old one stops working)."""
        with self._cond:
            worker_name = self.gate.admit(token, worker_name)
            if protocol_version != PROTOCOL_VERSION:
                raise Rejected(Code.FAILED_PRECONDITION, f"protocol version {protocol_version} is not supported "
                                                         f"(the rendezvous speaks {PROTOCOL_VERSION})")
            if self._finished():
                raise Rejected(Code.FAILED_PRECONDITION, "the run has finished; no new workers are accepted")
            peer = self.members.get(worker_name) if worker_name else None
            if peer is not None:
                peer.alive, peer.last_seen, peer.hostname, peer.address = True, self.clock(), hostname, address
            else:
                if len(self.members) >= self.cfg.cluster.workers:
                    raise Rejected(Code.FAILED_PRECONDITION, f"the run already has its {self.cfg.cluster.workers} "
                                                             f"workers (cluster.workers); no more are accepted")
                index = len(self.members)
                peer = Peer(worker_name or f"w{index}", index, hostname, address, self.clock())
                self.members[peer.worker_id] = peer
            session, peer.session_digest = new_session()
            self._cond.notify_all()
            return Joined(peer.worker_id, peer.index, self.run_id, self.config_yaml, session, self.peer_token)

    def attest_base(self, worker_id: str, token: str, digest: str) -> str:
        """A node's digest of its frozen base weights; the run's (the first stated), or Rejected if it differs."""
        with self._cond:
            peer = self._member(worker_id, token)
            self.base_digest = attested_base(worker_id, digest, self.base_digest)
            self._seen(peer)
            return self.base_digest

    def check_member(self, worker_id: str, token: str) -> None:
        """Refuse (Rejected) a caller that is not a member with the run's token; changes nothing. The servicer
        asks this before a call that may wait, so that a stranger holds no thread."""
        with self._cond:
            self._member(worker_id, token)

    def roster(self, worker_id: str, token: str, round_: int) -> Roster:
        """Record that the worker reached `round_`; who is in the run and where they listen."""
        with self._cond:
            peer = self._member(worker_id, token)
            self._check_round(worker_id, round_)
            self._seen(peer)
            peer.round = max(peer.round, round_)
            return Roster(round_, self.cfg.cluster.workers, self._finished(),
                          {p.index: p.address for p in self.members.values() if p.address})

    def heartbeat(self, worker_id: str, token: str, step: int = 0, loss: float | None = None,
                  eval_loss: float | None = None) -> None:
        with self._cond:
            peer = self._member(worker_id, token)
            for name, value in (("loss", loss), ("eval_loss", eval_loss)):
                if value is not None and not (math.isfinite(value) and value >= 0):
                    raise Rejected(Code.INVALID_ARGUMENT, f"worker {worker_id} reported {name} {value}: a loss is a "
                                                          "finite number >= 0")
            if step < 0:
                raise Rejected(Code.INVALID_ARGUMENT, f"worker {worker_id} reported inner step {step}: steps are >= 0")
            self._seen(peer)
            peer.step = max(peer.step, step)
            peer.loss = loss if loss is not None else peer.loss
            peer.eval_loss = eval_loss if eval_loss is not None else peer.eval_loss

    def leave(self, worker_id: str, token: str) -> None:
        """The worker is done (or giving up): rounds stop waiting for its reports."""
        with self._cond:
            peer = self._member(worker_id, token)
            peer.last_seen, peer.alive = self.clock(), False
            self._close_rounds()
            self._cond.notify_all()

    def tick(self) -> None:
        """Drop workers silent for longer than `cluster.heartbeat_timeout_s` (a server calls this periodically;
        a p2p worker must heartbeat while it trains)."""
        with self._cond:
            now = self.clock()
            for peer in self.members.values():
                if peer.alive and now - peer.last_seen > self.cfg.cluster.heartbeat_timeout_s:
                    peer.alive = False
            self._close_rounds()
            self._cond.notify_all()

    # ---- metrics -----------------------------------------------------------------------------
    def report(self, worker_id: str, token: str, round_: int, metrics: dict[str, float]) -> None:
        """One worker's metrics for `round_` (0..R-1; R: its final evaluation). Keys: train_loss, eval_loss,
        the cumulative counters (COUNTERS) and `sketch.0`..`sketch.{k-1}`; any other key is kept if finite."""
        with self._cond:
            peer = self._member(worker_id, token)
            self._check_round(worker_id, round_)
            if round_ < self.next_row:
                raise Rejected(Code.FAILED_PRECONDITION, f"stale round: worker {worker_id} reported round {round_}, "
                                                         f"whose row was already written without it")
            if round_ <= peer.reported:
                raise Rejected(Code.ALREADY_EXISTS, f"worker {worker_id} already reported round {peer.reported}; "
                                                    f"rounds are reported once, in order")
            check_metrics(worker_id, metrics, self._reports.get(round_, {}))
            self._seen(peer)
            self._reports.setdefault(round_, {})[worker_id] = dict(metrics)
            peer.reported = round_
            for key in COUNTERS:
                if key in metrics:
                    setattr(peer, key, int(metrics[key]))
            if round_ == self.total_rounds and "eval_loss" in metrics:
                peer.final_eval_loss = metrics["eval_loss"]
            self._close_rounds()
            self._cond.notify_all()

    # ---- queries -----------------------------------------------------------------------------
    def finished(self) -> bool:
        with self._cond:
            return self._finished()

    def wait_finished(self, timeout: float | None = None) -> bool:
        with self._cond:
            return self._cond.wait_for(self._finished, timeout)

    def wait_joined(self, timeout: float | None = None) -> bool:
        """Block until `cluster.workers` have joined (a p2p worker needs every neighbour's address)."""
        with self._cond:
            return self._cond.wait_for(lambda: len(self.members) >= self.cfg.cluster.workers, timeout)

    def members_copy(self) -> list[Peer]:
        with self._cond:
            return [dataclasses.replace(p) for p in self.members.values()]

    def summary(self) -> dict[str, Any]:
        with self._cond:
            members = list(self.members.values())
            n = max(len(members), 1)
            rounds = [r for r in self.rows if r["event"] == "round"]
            finals = [p.final_eval_loss for p in members if p.final_eval_loss is not None]
            return {
                "name": self.cfg.name, "run_id": self.run_id, "protocol": self.cfg.protocol.kind,
                "rounds": len(rounds),
                "final_eval_loss": sum(finals) / len(finals) if finals else None,
                "consensus_distance": rounds[-1]["consensus_distance"] if rounds else None,
                "tokens": sum(p.tokens for p in members),
                "wall_s": self.clock() - self.started,
                "bytes_sent_per_worker": sum(p.bytes_sent for p in members) / n,
                "bytes_received_per_worker": sum(p.bytes_received for p in members) / n,
                "bytes_total_per_worker": sum(p.bytes_sent + p.bytes_received for p in members) / n,
                "workers": {p.worker_id: {"index": p.index, "address": p.address, "alive": p.alive,
                                          "bytes_sent": p.bytes_sent, "bytes_received": p.bytes_received,
                                          "bytes_total": p.bytes_sent + p.bytes_received, "tokens": p.tokens,
                                          "final_eval_loss": p.final_eval_loss} for p in members},
            }

    # ---- internals ---------------------------------------------------------------------------
    def _finished(self) -> bool:
        """Every row written (the final one included), or every worker that joined has gone."""
        gone = bool(self.members) and not any(p.alive for p in self.members.values())
        return self.next_row > self.total_rounds or gone

    def _member(self, worker_id: str, token: str) -> Peer:
        """The calling worker, `token` its session (an unknown id is refused as UNAUTHENTICATED when the run
        has a token); changes nothing."""
        peer = self.members.get(worker_id)
        self.gate.check_session(token, peer.session_digest if peer is not None else "", worker_id)
        if peer is None:
            raise Rejected(Code.NOT_FOUND, f"unknown worker id {worker_id!r}: join first")
        return peer

    def _seen(self, peer: Peer) -> None:
        """A call that passed every check is proof of life (a refused one changes nothing, revives no one)."""
        peer.last_seen, peer.alive = self.clock(), True

    def _check_round(self, worker_id: str, round_: int) -> None:
        if not 0 <= round_ <= self.total_rounds:
            last = self.total_rounds - 1
            raise Rejected(Code.INVALID_ARGUMENT, f"worker {worker_id} named round {round_}; this run has rounds "
                                                  f"0..{last} (and {last + 1}: the final report)")

    def _close_rounds(self) -> None:
        """Write the row of every round, in order, that each live worker has reported or gone past (a worker
        whose report of round r was lost but who reported r + 1 does not hold round r's row up forever)."""
        while self.next_row <= self.total_rounds:
            r = self.next_row
            reports = self._reports.get(r, {})
            members = self.members.values()
            waiting = any(p.alive and p.reported < r for p in members)
            if waiting or not (reports or any(p.reported > r for p in members)):
                return
            now = self.clock()
            row = round_row(r, self.total_rounds, reports, list(members), now - self._row_at)
            self._row_at = now
            self.rows.append(row)
            if self.run_dir is not None:
                self.run_dir.log(**row)
            self._reports.pop(r, None)
            self.next_row = r + 1
