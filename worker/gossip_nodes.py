"""One node's side of a gossip step, per scheme: what it sends, and how it takes in what arrived.

Each node class wraps the pure per-node functions of protocols/gossip with the state the scheme keeps
between steps, and speaks `PeerMessage`s, so the round loop (worker/gossip_loop.py) is one driver for all
three and a test can route messages between nodes by hand. A step is `outgoing(round, step, W)` (messages
by receiver), then `absorb(step, W, received)` with whatever arrived (by sender). W is the step's mixing
matrix (`GossipConfig.mixing_matrix`); node i's row says whom it hears, its column whom it sends to.

What a missing message does, per scheme:
- average: the weights are renormalized over the models that arrived (still a convex combination; the
  network average then drifts a little, as it does for any row-stochastic step).
- push_sum: the mass sent along it is lost, sums and weights alike, so the estimate s / w stays an
  unbiased ratio of what remains (Kempe et al.'s robustness to lost messages).
- choco: q_j counts as 0 here, so this node's copy of x_hat_j lags the sender's own by that q_j for the
  rest of the run (CHOCO assumes reliable links: protocols/gossip/choco.py); the skip is counted.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from compression.payload import dense
from protocols.gossip.average import mix
from protocols.gossip.choco import ChocoNode, choco_absorb, choco_consensus, choco_init, choco_message, decode_message
from protocols.gossip.config import GossipConfig
from protocols.gossip.mixing import incoming_weights, outgoing_weights
from protocols.gossip.push_sum import (
    PushSumState,
    push_sum_combine,
    push_sum_estimate,
    push_sum_init,
    push_sum_rebase,
    push_sum_split,
)
from protocols.gossip.variance import corrected_mix
from protocols.replica import Params
from worker.transports.peers import PeerMessage


class GossipNode(ABC):
    def __init__(self, index: int, cfg: GossipConfig) -> None:
        self.index, self.cfg = index, cfg

    @abstractmethod
    def model(self) -> Params:
        """The parameters to train and evaluate: this node's current estimate of the average."""

    @abstractmethod
    def rebase(self, params: Params) -> None:
        """Take `params` (after local training or an outer step) as this node's model."""

    @abstractmethod
    def outgoing(self, round_: int, step: int, w: torch.Tensor) -> dict[int, PeerMessage]:
        """The messages of gossip step `step`, by receiver (node i's out-neighbours in W's column i)."""

    @abstractmethod
    def absorb(self, step: int, w: torch.Tensor, received: dict[int, PeerMessage]) -> None:
        """Mix in the messages of step `step` that arrived (by sender; a subset of node i's in-neighbours)."""

    def _receivers(self, w: torch.Tensor) -> list[int]:
        return sorted(outgoing_weights(w, self.index)[1])


class AverageNode(GossipNode):
    """x_i <- sum_j W[i, j] x_j over what arrived (D-PSGD), variance-corrected when the config says so: after
    every gossip step, since each step's average shrinks the variance of what went into it (with Q > 1
    steps a round the contributors of the round's end result are not known to the node, each step's are)."""

    def __init__(self, index: int, cfg: GossipConfig, params: Params) -> None:
        super().__init__(index, cfg)
        self.x = dict(params)

    def model(self) -> Params:
        return self.x

    def rebase(self, params: Params) -> None:
        self.x = dict(params)

    def outgoing(self, round_: int, step: int, w: torch.Tensor) -> dict[int, PeerMessage]:
        payloads = {name: dense(t) for name, t in self.x.items()}  # shared by every receiver: never mutated
        return {j: PeerMessage(round_, step, self.index, payloads) for j in self._receivers(w)}

    def absorb(self, step: int, w: torch.Tensor, received: dict[int, PeerMessage]) -> None:
        self_weight, weights = incoming_weights(w, self.index)
        models = {j: decode_message(received[j].payloads) for j in weights if j in received}
        total = self_weight + sum(weights[j] for j in models)
        renormalized = {j: weights[j] / total for j in models}
        vc = self.cfg.variance_correction
        if self.cfg.corrects_variance:
            self.x = corrected_mix(self.x, models, renormalized, self_weight / total,
                                   self_weighted=vc.self_weighted, exclude=vc.exclude)
        else:
            self.x = mix(self.x, models, renormalized, self_weight / total)


class PushSumNode(GossipNode):
    """Push-sum (protocols/gossip/push_sum.py): mass (s, w) split along W's column, summed on arrival;
    the model is the de-biased estimate s / w."""

    def __init__(self, index: int, cfg: GossipConfig, params: Params) -> None:
        super().__init__(index, cfg)
        self.like = dict(params)  # names and dtypes the estimate is returned in
        self.state = push_sum_init(params)
        self.kept = self.state

    def model(self) -> Params:
        return push_sum_estimate(self.state, self.like)

    def rebase(self, params: Params) -> None:
        self.state = push_sum_rebase(self.state, params)

    def outgoing(self, round_: int, step: int, w: torch.Tensor) -> dict[int, PeerMessage]:
        keep, shares = outgoing_weights(w, self.index)
        self.kept, parts = push_sum_split(self.state, shares, keep)
        return {j: PeerMessage(round_, step, self.index, {n: dense(t) for n, t in part.s.items()}, part.w)
                for j, part in sorted(parts.items())}

    def absorb(self, step: int, w: torch.Tensor, received: dict[int, PeerMessage]) -> None:
        parts = [PushSumState(decode_message(m.payloads), m.weight) for _, m in sorted(received.items())]
        self.state = push_sum_combine(self.kept, parts)


class ChocoGossipNode(GossipNode):
    """CHOCO-SGD's communication (Koloskova et al. 2019, Algorithm 2 order): send q_i = Q(x_i - x_hat_i),
    update the copies with every q that arrived, then the consensus step on the copies."""

    def __init__(self, index: int, cfg: GossipConfig, params: Params) -> None:
        super().__init__(index, cfg)
        self.node = choco_init(params)
        self.compressor = cfg.choco.compressor()
        self.own_q: Params = {}

    def model(self) -> Params:
        return self.node.x

    def rebase(self, params: Params) -> None:
        self.node = ChocoNode(dict(params), self.node.x_hat, self.node.mixed)

    def outgoing(self, round_: int, step: int, w: torch.Tensor) -> dict[int, PeerMessage]:
        payloads, self.own_q = choco_message(self.node, self.compressor)
        return {j: PeerMessage(round_, step, self.index, payloads) for j in self._receivers(w)}

    def absorb(self, step: int, w: torch.Tensor, received: dict[int, PeerMessage]) -> None:
        self_weight, weights = incoming_weights(w, self.index)
        qs = {j: decode_message(received[j].payloads) for j in weights if j in received}
        self.node = choco_absorb(self.node, self.own_q, qs, {j: weights[j] for j in qs}, self_weight)
        self.node = choco_consensus(self.node, self.cfg.choco.gamma)


def make_node(cfg: GossipConfig, index: int, params: Params) -> GossipNode:
    """The node of `cfg.scheme` for node `index`, starting from `params`."""
    kinds: dict[str, type[AverageNode | PushSumNode | ChocoGossipNode]] = {
        "average": AverageNode, "push_sum": PushSumNode, "choco": ChocoGossipNode}
    return kinds[cfg.scheme](index, cfg, params)
