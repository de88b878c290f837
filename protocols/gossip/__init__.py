"""Decentralized gossip averaging: the pure, tensor-level part of protocol `gossip`.

No aggregator: each worker mixes its model with its graph neighbours' (DESIGN.md, protocol table; Tian et
al. arXiv:2404.04616, D-PSGD arXiv:1705.09056, CHOCO arXiv:1902.00340, push-sum). The package holds the
config section (`config`), the graphs (`topology`), their weights (`mixing`), the three schemes
(`average`, `push_sum`, `choco`), the variance correction (`variance`) and the optional outer step
(`outer`). Every function is pure over `Params` dicts; the p2p transport and the round loop that call
them live in `worker/`. Importing the package registers `GossipConfig` under kind "gossip".
"""

from protocols.gossip.average import consensus_distance, gossip_average, mix, network_mean
from protocols.gossip.choco import (
    ChocoNode,
    choco_absorb,
    choco_consensus,
    choco_init,
    choco_message,
    choco_models,
    choco_step,
    decode_message,
)
from protocols.gossip.config import ChocoConfig, GossipConfig, GossipOuterConfig, Scheme, VarianceCorrectionConfig
from protocols.gossip.mixing import (
    column_stochastic,
    incoming_weights,
    is_doubly_stochastic,
    metropolis_hastings,
    mixing_matrix,
    outgoing_weights,
    spectral_gap,
    uniform_incoming,
)
from protocols.gossip.outer import gossip_outer_step, pseudo_gradient
from protocols.gossip.push_sum import (
    PushSumState,
    push_sum_combine,
    push_sum_estimate,
    push_sum_init,
    push_sum_rebase,
    push_sum_split,
    push_sum_step,
)
from protocols.gossip.topology import TOPOLOGIES, Neighbours, Topology, adjacency, in_neighbours, neighbours
from protocols.gossip.variance import (
    DEFAULT_EXCLUDE,
    corrected_gossip_average,
    corrected_mix,
    layer_variance,
    variance_correct,
)

__all__ = [
    "DEFAULT_EXCLUDE",
    "TOPOLOGIES",
    "ChocoConfig",
    "ChocoNode",
    "GossipConfig",
    "GossipOuterConfig",
    "Neighbours",
    "PushSumState",
    "Scheme",
    "Topology",
    "VarianceCorrectionConfig",
    "adjacency",
    "choco_absorb",
    "choco_consensus",
    "choco_init",
    "choco_message",
    "choco_models",
    "choco_step",
    "column_stochastic",
    "consensus_distance",
    "corrected_gossip_average",
    "corrected_mix",
    "decode_message",
    "gossip_average",
    "gossip_outer_step",
    "in_neighbours",
    "incoming_weights",
    "is_doubly_stochastic",
    "layer_variance",
    "metropolis_hastings",
    "mix",
    "mixing_matrix",
    "neighbours",
    "network_mean",
    "outgoing_weights",
    "pseudo_gradient",
    "push_sum_combine",
    "push_sum_estimate",
    "push_sum_init",
    "push_sum_rebase",
    "push_sum_split",
    "push_sum_step",
    "spectral_gap",
    "uniform_incoming",
    "variance_correct",
]
