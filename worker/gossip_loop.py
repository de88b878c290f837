"""The gossip round loop: decentralized training with no aggregator, over any `PeerTransport`.

Round r (protocols/gossip/config.py): evaluate when due, H inner steps (the session's trainer, AdamW state
kept across rounds as in DiLoCo), Q gossip steps of the configured scheme (worker/gossip_nodes.py), then
the optional NoLoCo-style outer step on the result; then report the round's metrics to the rendezvous:
train loss, eval loss when evaluated, a random-projection sketch of the model (from which the rendezvous
estimates the consensus distance: protocols/gossip/sketch.py) and the cumulative bytes and tokens. After
the last round the node evaluates its final model and reports it as round R.

A gossip step: send this node's messages to its out-neighbours, wait up to `peer_timeout_s` for those of
its in-neighbours, mix in what came. A neighbour whose message did not arrive is skipped for that step
and counted (`skipped_messages`); a send the receiver refused is counted (`refused_sends`) and logged by
the transport. Nothing waits longer than the timeout, so one vanished peer slows its neighbours down and
stops nobody. It does slow them down by a whole timeout at every step, though, so their other neighbours,
waiting with the same timeout, may give up on them just before their messages come: the skips spread one
hop. Not waiting for a peer known to be dead (the rendezvous' liveness in the roster) would stop that; it
is not done yet.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from protocols.gossip.config import GossipConfig
from protocols.gossip.mixing import incoming_weights
from protocols.gossip.outer import gossip_outer_step
from protocols.gossip.sketch import sketch
from protocols.gossip.topology import TIME_VARYING
from protocols.replica import Params
from worker.gossip_nodes import GossipNode, make_node
from worker.loop import Progress
from worker.session import Session
from worker.trainer import params_digest
from worker.transports.peers import PeerTransport


@dataclass
class GossipResult:
    worker_id: str
    index: int = 0
    rounds: int = 0
    steps: int = 0
    tokens: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    bytes_total: int = 0
    final_eval_loss: float | None = None
    evals: list[dict[str, Any]] = field(default_factory=list)  # {"round", "step", "eval_loss"} of own model
    # What this node saw of consensus, a row a round: messages received and skipped in its gossip steps, and
    # how far gossip (and the outer step) moved its model, ||after - before||: shrinks as the models agree.
    consensus: list[dict[str, float]] = field(default_factory=list)
    param_hash: str = ""  # params_digest of the final model
    base_hash: str = ""  # digest of the frozen base under adapters ("" when every weight trains)
    skipped_messages: int = 0  # in-neighbours' messages that had not arrived by the timeout
    refused_sends: int = 0  # own messages a neighbour refused (or that found it gone)
    wall_s: float = 0.0


def distance(a: Params, b: Params) -> float:
    """||a - b|| over the floating tensors."""
    return math.sqrt(sum(float((a[n].detach().double() - b[n].detach().double()).pow(2).sum())
                         for n, t in a.items() if t.dtype.is_floating_point))


class GossipLoop:
    def __init__(self, session: Session, transport: PeerTransport, cfg: GossipConfig | None = None,
                 progress: Progress | None = None) -> None:
        protocol = cfg if cfg is not None else session.cfg.protocol
        if not isinstance(protocol, GossipConfig):
            raise ValueError(f"the gossip loop runs protocol.kind 'gossip', not {protocol.kind!r}")
        self.session, self.transport, self.cfg, self.progress = session, transport, protocol, progress
        self.result = GossipResult(worker_id=getattr(transport, "worker_id", ""))
        self.momentum: Params = {}  # the outer step's buffers: this node's own, never exchanged
        self._matrices: dict[int, torch.Tensor] = {}
        self.final_params: Params = {}

    def matrix(self, step: int) -> torch.Tensor:
        """W of gossip step `step` (static topologies: computed once)."""
        key = step if self.cfg.topology in TIME_VARYING else 0
        if key not in self._matrices:
            self._matrices[key] = self.cfg.mixing_matrix(self.transport.workers, step)
        return self._matrices[key]

    def gossip_step(self, node: GossipNode, round_: int, step: int) -> int:
        """One gossip step of `node` over the transport; the number of in-neighbours' messages that came."""
        w = self.matrix(step)
        handles = [self.transport.send(j, m) for j, m in node.outgoing(round_, step, w).items()]
        senders = set(incoming_weights(w, node.index)[1])
        received = self.transport.receive(step, senders, self.cfg.peer_timeout_s)
        node.absorb(step, w, received)
        self.result.skipped_messages += len(senders - set(received))
        self.result.refused_sends += sum(not h.result() for h in handles)
        return len(received)

    def _evaluate(self, round_: int) -> float:
        loss = self.session.evaluate()
        self.result.evals.append({"round": round_, "step": self.session.trainer.step_count, "eval_loss": loss})
        return loss

    def _counters(self) -> dict[str, float]:
        return {"bytes_sent": float(self.transport.bytes_sent), "bytes_received": float(self.transport.bytes_received),
                "tokens": float(self.result.tokens), "steps": float(self.result.steps)}

    def run(self) -> GossipResult:
        session, transport = self.session, self.transport
        transport.start(session.params(), session.base_digest())
        # A p2p transport learns its index and id when it joins: read them after `start`.
        self.result.worker_id = getattr(transport, "worker_id", self.result.worker_id)
        self.result.index = transport.index
        node = make_node(self.cfg, transport.index, session.params())
        for round_ in range(session.cfg.rounds):
            if transport.roster(round_).finished:
                break
            self._round(node, round_)
        return self._finish(node)

    def _round(self, node: GossipNode, round_: int) -> None:
        """Evaluate when due, train H steps, gossip Q steps, the outer step if any; report the round."""
        session, cfg, result = self.session, self.cfg, self.result
        start = node.model()
        session.trainer.load_params(start)
        metrics: dict[str, float] = {}
        if session.eval_batches and session.eval_due(round_):
            metrics["eval_loss"] = self._evaluate(round_)
        steps = session.steps_in_round(round_)
        losses = [session.trainer.step() for _ in range(steps)]
        node.rebase(session.params())
        trained = node.model()
        received = sum(self.gossip_step(node, round_, round_ * cfg.gossip_steps + q) for q in range(cfg.gossip_steps))
        if cfg.outer.enabled:
            params, self.momentum = gossip_outer_step(start, node.model(), self.momentum, cfg.outer.lr,
                                                      cfg.outer.momentum, cfg.outer.nesterov)
            node.rebase(params)
        result.rounds, result.steps = result.rounds + 1, result.steps + steps
        result.tokens += steps * session.tokens_per_step
        result.consensus.append({"round": float(round_), "received": float(received),
                                 "skipped": float(result.skipped_messages), "moved": distance(node.model(), trained)})
        metrics.update(train_loss=sum(losses) / max(len(losses), 1), **self._counters())
        metrics.update({f"sketch.{k}": v for k, v in enumerate(sketch(node.model(), seed=cfg.seed))})
        self.transport.report(round_, metrics)
        if self.progress is not None:
            self.progress({"worker": result.worker_id, "round": round_, "step": session.trainer.step_count,
                           **{k: v for k, v in metrics.items() if not k.startswith("sketch.")}})

    def _finish(self, node: GossipNode) -> GossipResult:
        session, result = self.session, self.result
        self.final_params = node.model()
        session.trainer.load_params(self.final_params)
        final: dict[str, float] = {}
        if session.eval_batches:
            final["eval_loss"] = result.final_eval_loss = self._evaluate(result.rounds)
        self.transport.report(session.cfg.rounds, {**final, **self._counters()})
        result.param_hash = params_digest(self.final_params)
        result.base_hash = session.base_digest()
        return result

    def finish(self) -> GossipResult:
        """Fill in the byte counters and wall time (call once the transport is closed)."""
        r = self.result
        r.bytes_sent, r.bytes_received = self.transport.bytes_sent, self.transport.bytes_received
        r.bytes_total = r.bytes_sent + r.bytes_received
        r.wall_s = time.monotonic() - self.session.started
        return r
