"""The `protocol: {kind: gossip}` section: decentralized training with no aggregator.

Each round every worker takes `inner_steps` local steps, then `gossip_steps` gossip steps with its graph
neighbours; the coordinator only does rendezvous (who is in, at which address), so the kind is not
coordinated. Per round: H local steps -> Q gossip steps (scheme over the topology's mixing matrix; with
scheme average each step's average is variance-corrected) -> optional outer step on the result.

What can only be checked once the number of workers n is known (a torus's shape, a k-regular graph's
existence, epidemic fanout < n) is `GossipConfig.check_nodes(n)`.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field, PositiveFloat, PositiveInt, model_validator

from compression import registry as codecs
from compression.base import Compressor
from protocols.gossip.mixing import mixing_matrix
from protocols.gossip.topology import DIRECTED, TIME_VARYING, Topology, check_random_regular, torus_shape
from protocols.gossip.variance import DEFAULT_EXCLUDE
from protocols.settings import Codec, ConfigError, ProtocolSettings, _Strict

Scheme = Literal["average", "push_sum", "choco"]


class ChocoConfig(_Strict):
    """CHOCO-Gossip (Koloskova, Stich, Jaggi, ICML 2019, arXiv:1902.00340): nodes send Q(x_i - x_hat_i)
    and step x_i += gamma * sum_j w_ij (x_hat_j - x_hat_i). Q must be a contraction (top-k, random-k,
    the quantizers); no error feedback is needed, x_hat tracking plays its part. gamma is the consensus
    step size: the paper tunes it per codec and graph; it has to shrink with the kept fraction: on a ring
    of 8 with top-10%, 0.2 gains ~8 orders of magnitude in 400 steps while 0.5 and up diverge
    (tests/unit/test_gossip_choco.py). The defaults are that pair."""

    codec: Codec = "topk"
    density: float = Field(0.1, gt=0.0, le=1.0)  # fraction kept by topk / randomk
    gamma: float = Field(0.2, gt=0.0, le=1.0)

    def compressor(self) -> Compressor:
        return codecs.build(self.codec, density=self.density)


class VarianceCorrectionConfig(_Strict):
    """Tian et al., arXiv:2404.04616 (protocols/gossip/variance.py): after averaging, rescale each layer
    around its mean so its variance is the mean variance of the models that went into it.

    enabled: None = on for scheme average (the paper's setting), off for push_sum and choco, whose
    state (push-sum's mass, CHOCO's x_hat copies) a rescale would corrupt; True with them is an error.
    self_weighted: the target is the mixing-weighted mean of the variances (own model included) instead
    of the plain mean over the contributing models. exclude: fnmatch patterns (matched against the whole
    dotted name or any one component) of tensors that are only plain-averaged: norm gains and biases are
    not Xavier-distributed, and averaging does not shrink them.
    """

    enabled: bool | None = None
    self_weighted: bool = False
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE


class GossipOuterConfig(_Strict):
    """A NoLoCo-style outer step (Kolehmainen et al., arXiv:2506.10911) on the gossip average: the
    pseudo-gradient start_of_round - average through outer SGD with Nesterov momentum
    (protocols/gossip/outer.py). Off: a node simply takes the average (D-PSGD with local steps)."""

    enabled: bool = False
    lr: PositiveFloat = 0.7
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    nesterov: bool = True


class GossipConfig(ProtocolSettings):
    """workers gossip with graph neighbours over p2p links; the coordinator only does rendezvous, so
    there is no Protocol to build."""

    kind: Literal["gossip"] = "gossip"
    coordinated: ClassVar[bool] = False
    # One-peer exponential (Ying et al. 2021): one message per node per step, exact consensus in log2(n)
    # steps for n a power of two; see protocols/gossip/topology.py for every topology.
    topology: Topology = "one_peer_exponential"
    rows: PositiveInt | None = None  # torus: rows (must divide n); None = square torus
    degree: PositiveInt = 4  # random_regular: k (n * k even, 3 <= k < n)
    fanout: PositiveInt | None = None  # epidemic: s peers pushed to per step; None = ceil(log2 n)
    inner_steps: PositiveInt = 50  # H: local steps per round
    gossip_steps: PositiveInt = 1  # Q: gossip steps per round
    scheme: Scheme = "average"
    choco: ChocoConfig = ChocoConfig()
    variance_correction: VarianceCorrectionConfig = VarianceCorrectionConfig()
    outer: GossipOuterConfig = GossipOuterConfig()
    seed: int = 0  # random_regular's graph and epidemic's per-step draws
    # How long a node waits for a gossip step's messages; a neighbour whose message has not arrived by then
    # is left out of that step (the mixing weights renormalized over what came), so a vanished peer costs
    # its neighbours this much per step, never a hang.
    peer_timeout_s: PositiveFloat = 30.0
    # Each worker seeds its model with run seed + its index (the setting of Tian et al., whose variance
    # correction matters most when the models being averaged are uncorrelated); False: every worker starts
    # from the same model, as in D-PSGD (worker/session.py reads this).
    independent_init: bool = False

    @model_validator(mode="after")
    def _combination_makes_sense(self) -> GossipConfig:
        for field, topology in (("rows", "torus"), ("degree", "random_regular"), ("fanout", "epidemic")):
            # Set *and* not the default: a resolved config written back as YAML (config.yaml, the rendezvous'
            # copy for p2p workers) names every field, `rows: null` included, and must parse again.
            default = type(self).model_fields[field].default
            if field in self.model_fields_set and getattr(self, field) != default and self.topology != topology:
                raise ValueError(f"protocol.{field} applies to topology {topology!r} only, not {self.topology!r}")
        if self.scheme == "push_sum" and self.topology not in DIRECTED:
            raise ValueError(
                f"protocol.scheme 'push_sum' is for directed topologies ({', '.join(sorted(DIRECTED))}); on "
                f"{self.topology!r} the Metropolis-Hastings weights are doubly stochastic: use scheme 'average'"
            )
        if self.scheme == "choco" and self.topology in DIRECTED | TIME_VARYING:
            raise ValueError(
                f"protocol.scheme 'choco' needs a static undirected topology (ring, torus, random_regular, full): "
                f"its x_hat copies assume fixed symmetric weights, got {self.topology!r}"
            )
        if self.variance_correction.enabled and self.scheme != "average":
            raise ValueError(
                f"protocol.variance_correction applies to scheme 'average' only: rescaling would corrupt "
                f"{self.scheme}'s state; set variance_correction.enabled to false"
            )
        if self.scheme == "choco":
            self.choco.compressor()  # an impossible codec setting fails here, not in the first round
        return self

    @property
    def corrects_variance(self) -> bool:
        enabled = self.variance_correction.enabled
        return self.scheme == "average" if enabled is None else enabled

    def check_cluster(self, workers: int) -> None:
        self.check_nodes(workers)

    def check_nodes(self, n: int) -> None:
        """ConfigError naming the field when this section cannot run on `n` workers."""
        if n < 1:
            raise ConfigError(f"gossip needs at least one worker, got {n}")
        if self.topology == "torus":
            try:
                torus_shape(n, self.rows)
            except ValueError as err:
                raise ConfigError(f"protocol.rows: {err}") from None
        if self.topology == "random_regular" and n > 1:
            problem = check_random_regular(n, self.degree)
            if problem:
                raise ConfigError(f"protocol.degree: {problem}")
        if self.topology == "epidemic" and self.fanout is not None and n > 1 and self.fanout >= n:
            raise ConfigError(f"protocol.fanout must be < the number of workers ({n}), got {self.fanout}")

    def mixing_matrix(self, n: int, step: int) -> torch.Tensor:
        """W of gossip step `step` (round * gossip_steps + q) for n workers."""
        self.check_nodes(n)
        return mixing_matrix(self, n, step)
