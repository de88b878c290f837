"""CHOCO-Gossip: consensus with compressed messages and no error feedback.

Koloskova, Stich, Jaggi, "Decentralized Stochastic Optimization and Gossip Algorithms with Compressed
Communication", ICML 2019, arXiv:1902.00340, Algorithm 1. Every node i keeps a public copy x_hat_i of its
model that all its neighbours hold too (all start at 0); a step is

    x_i     += gamma * sum_j w_ij (x_hat_j - x_hat_i)       (consensus, on the copies)
    q_i      = Q(x_i - x_hat_i)                             (compressed, sent to every neighbour)
    x_hat_j += q_j  for j in N_i and j = i                  (every holder updates the same copy)

Q only has to be a contraction (top-k, random-k, quantizers): the copies converge to the models, so what
is sent shrinks to zero and no error-feedback memory is needed. With symmetric doubly stochastic W,
sum_i x_i is invariant (the consensus term sums to zero over the network).

Memory: rather than a copy per neighbour, node i keeps s_i = sum_j w_ij x_hat_j (j in N_i and i), which
is all step 1 needs since the row sums to 1 (sum_j w_ij (x_hat_j - x_hat_i) = s_i - x_hat_i), and updates
it with the weighted messages (the paper's memory-efficient variant, CHOCO-SGD's appendix). That ties s_i
to one fixed W: CHOCO runs on static topologies only (`GossipConfig` refuses the others).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from compression import registry as codecs
from compression.base import Compressor
from compression.payload import Payload
from protocols.gossip.average import check_models, weighted_sum, work_dtype
from protocols.gossip.mixing import incoming_weights
from protocols.replica import Params


@dataclass(frozen=True)
class ChocoNode:
    """x: the node's model [its dtypes]. x_hat: its public copy; mixed: s_i = sum_j w_ij x_hat_j over its
    neighbourhood and itself. Copies cover the floating tensors only, in at least float32."""

    x: Params
    x_hat: Params
    mixed: Params


def choco_init(x: Params) -> ChocoNode:
    zeros = {n: torch.zeros_like(t, dtype=work_dtype(t)) for n, t in x.items() if t.dtype.is_floating_point}
    return ChocoNode(dict(x), zeros, {n: z.clone() for n, z in zeros.items()})


def choco_consensus(node: ChocoNode, gamma: float) -> ChocoNode:
    """Step 1: x_i += gamma * (s_i - x_hat_i)."""
    if not 0.0 < gamma <= 1.0:
        raise ValueError(f"CHOCO's consensus step size gamma must be in (0, 1], got {gamma}")
    x = dict(node.x)
    for name, hat in node.x_hat.items():
        t = node.x[name]
        x[name] = torch.add(t.detach().to(hat.dtype), node.mixed[name] - hat, alpha=gamma).to(t.dtype)
    return ChocoNode(x, node.x_hat, node.mixed)


def choco_message(node: ChocoNode, compressor: Compressor) -> tuple[dict[str, Payload], Params]:
    """Step 2: (payloads of Q(x_i - x_hat_i) to send, q_i as every receiver decodes it).

    The node applies the decoded q_i, not the uncompressed difference, so its copy of x_hat_i stays
    bit-identical to its neighbours'.
    """
    payloads = {
        name: compressor.compress(node.x[name].detach().to(hat.dtype) - hat, key=name)
        for name, hat in node.x_hat.items()
    }
    return payloads, decode_message(payloads)


def decode_message(payloads: Mapping[str, Payload]) -> Params:
    """A neighbour's q_j from its payloads (validated against their headers)."""
    return {name: codecs.decode(p) for name, p in payloads.items()}


def choco_absorb(
    node: ChocoNode, own: Params, received: Mapping[int, Params], weights: Mapping[int, float], self_weight: float
) -> ChocoNode:
    """Step 3: x_hat_i += q_i; s_i += self_weight * q_i + sum_j weights[j] * q_j.

    own: q_i (from `choco_message`). received: neighbour -> q_j. weights: neighbour -> w_ij, the same row
    of the same W every step (a neighbour whose message is lost must be resent, not skipped: its copy
    would drift from the one it holds of itself).
    """
    if set(received) != set(weights):
        raise ValueError(f"weights are for neighbours {sorted(weights)} but messages came from {sorted(received)}")
    senders = sorted(received)
    check_models([node.x_hat, own, *(received[j] for j in senders)], what="CHOCO message")
    x_hat: Params = {}
    mixed: Params = {}
    for name, hat in node.x_hat.items():
        q = own[name].to(hat)
        x_hat[name] = hat + q
        terms = [node.mixed[name], q, *(received[j][name].to(hat) for j in senders)]
        mixed[name] = weighted_sum(terms, [1.0, self_weight, *(weights[j] for j in senders)])
    return ChocoNode(node.x, x_hat, mixed)


def choco_step(
    nodes: Sequence[ChocoNode], w: torch.Tensor, gamma: float, compressor: Compressor
) -> list[ChocoNode]:
    """One CHOCO-Gossip step for the whole network (simulation), built from the per-node functions.

    w: [n, n] symmetric doubly stochastic, the same every step.
    """
    n = len(nodes)
    if tuple(w.shape) != (n, n):
        raise ValueError(f"mixing matrix has shape {tuple(w.shape)}, expected ({n}, {n}) for {n} nodes")
    stepped = [choco_consensus(node, gamma) for node in nodes]
    messages = [choco_message(node, compressor)[1] for node in stepped]
    out = []
    for i, node in enumerate(stepped):
        self_weight, weights = incoming_weights(w, i)
        out.append(choco_absorb(node, messages[i], {j: messages[j] for j in weights}, weights, self_weight))
    return out


def choco_models(nodes: Sequence[ChocoNode]) -> list[Params]:
    return [node.x for node in nodes]
