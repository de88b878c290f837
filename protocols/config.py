"""Run configuration: pydantic models, YAML recipes and dotted `--set` overrides.

One `RunConfig` describes a whole run and is shared by the coordinator, the workers and the launcher.
`protocol` is a tagged union on `kind` over every `ProtocolSettings` subclass that the protocol modules
declare (`protocols.registry` imports them all), so a new protocol file needs no entry here. A bad config
fails here, before anything starts, with one message that names the field and what is allowed
(`ConfigError`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Union

import yaml
from pydantic import Field, ValidationError, model_validator

from protocols.downlink import Downlink
from protocols.faults_config import FaultsConfig
from protocols.registry import protocol_class, settings_models
from protocols.settings import (
    PROTOCOL_VERSION,
    ClusterConfig,
    CompressionConfig,
    ConfigError,
    DataConfig,
    DownlinkConfig,
    LinkConfig,
    LowRankConfig,
    ModelConfig,
    ProtocolSettings,
    TrainConfig,
    _Strict,
)
from protocols.simulation_config import SimulationConfig

__all__ = [
    "PROTOCOL_VERSION",
    "ClusterConfig",
    "CompressionConfig",
    "ConfigError",
    "DataConfig",
    "DownlinkConfig",
    "LinkConfig",
    "LowRankConfig",
    "ModelConfig",
    "ProtocolConfig",
    "RunConfig",
    "TrainConfig",
    "apply_overrides",
    "load_config",
    "parse_config",
    "to_yaml",
    "with_cluster",
]

# The protocol kind with no aggregator: workers mix models with their graph neighbours (protocols/gossip).
GOSSIP = "gossip"
# The protocols whose straggler controls (late updates folded, adaptive inner steps) are supported.
STRAGGLER_KINDS = ("diloco", "sparseloco")

if TYPE_CHECKING:
    ProtocolConfig = ProtocolSettings
else:
    ProtocolConfig = Annotated[Union[tuple(settings_models())], Field(discriminator="kind")]  # noqa: UP007


class RunConfig(_Strict):
    name: str = Field("diloco", min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    seed: int = 0
    run_dir: str = "runs"
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    protocol: ProtocolConfig = Field(default_factory=lambda: ProtocolSettings.registry["diloco"].model_validate({}))
    cluster: ClusterConfig = ClusterConfig()
    # None: the transport's own speed; else every worker's transport is wrapped in an emulated link, its own
    # when the block varies per worker (`LinkConfig.for_worker`).
    link: LinkConfig | None = None
    # None: every weight trains, as in the paper of each protocol; else adapters or GaLore (LowRankConfig).
    lowrank: LowRankConfig | None = None
    # Initial weights: a lowband run directory (its checkpoint.pt; a run trained with adapters must be
    # exported first, `lowband export`) or a checkpoint file. None: the seed's random initialization.
    init_from: str | None = None
    # `lowband simulate`: federated clients as state (protocols/simulation_config.py); None for other runs.
    simulation: SimulationConfig | None = None
    # Injected slowness (protocols/faults_config.py): per-worker straggler factors, for experiments.
    faults: FaultsConfig = FaultsConfig()

    @model_validator(mode="before")
    @classmethod
    def _default_protocol_kind(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("protocol"), dict):
            data = {**data, "protocol": {"kind": "diloco", **data["protocol"]}}
        return data

    @model_validator(mode="before")
    @classmethod
    def _gossip_defaults_to_p2p(cls, data: Any) -> Any:
        """A gossip config that names no transport runs over p2p: the star's default, grpc, cannot carry it."""
        if not (isinstance(data, dict) and isinstance(data.get("protocol"), dict)):
            return data
        if data["protocol"].get("kind") != GOSSIP:
            return data
        cluster = data.get("cluster", {})
        if isinstance(cluster, dict) and "transport" not in cluster:
            return {**data, "cluster": {**cluster, "transport": "p2p"}}
        if isinstance(cluster, ClusterConfig) and "transport" not in cluster.model_fields_set:
            return {**data, "cluster": cluster.model_copy(update={"transport": "p2p"})}
        return data

    @model_validator(mode="after")
    def _transport_fits_protocol(self) -> RunConfig:
        """Gossip has no aggregator, so neither the star nor all-gather can run it; p2p carries gossip only."""
        transport, kind = self.cluster.transport, self.protocol.kind
        if kind == GOSSIP and transport in ("grpc", "allgather"):
            raise ValueError(
                f"cluster.transport {transport!r} needs an aggregator, and protocol 'gossip' has none: use 'p2p' "
                f"(workers serve each other over gRPC, the coordinator only does rendezvous) or 'inproc' (one process)"
            )
        if kind != GOSSIP and transport == "p2p":
            raise ValueError(
                f"cluster.transport 'p2p' carries gossip only (protocol.kind 'gossip'); protocol {kind!r} runs over "
                f"'grpc', 'allgather' or 'inproc'"
            )
        return self

    @model_validator(mode="after")
    def _protocol_builds(self) -> RunConfig:
        """Build the protocol and its downlink once, so what only they can check (EControl's derived eta, a
        sparse downlink for a protocol that keeps shifts, ...) fails here, before anything starts; then the
        section's own checks against the cluster and the whole run (`check_cluster`, `check_run`)."""
        if self.protocol.coordinated:
            protocol = protocol_class(self.protocol.kind).from_settings(self.protocol)
            Downlink.of(self.protocol, protocol)
        self.protocol.check_cluster(self.cluster.workers)
        self.protocol.check_run(self)
        return self

    @model_validator(mode="after")
    def _adapters_share_a_base(self) -> RunConfig:
        """Adapters train against one frozen base on every worker; independently seeded models have none."""
        method = self.lowrank.method if self.lowrank is not None else None
        if method in ("lora", "pissa") and getattr(self.protocol, "independent_init", False):
            raise ValueError(
                f"lowrank.method {method!r} trains adapters over one frozen base shared by every "
                "worker, but protocol.independent_init gives each worker its own random model: set "
                "protocol.independent_init false (or train every weight)"
            )
        return self

    @model_validator(mode="after")
    def _one_link_per_worker(self) -> RunConfig:
        """`link.workers` gives worker i entry i: it must list exactly `cluster.workers` links."""
        if self.link is not None and self.link.workers is not None and len(self.link.workers) != self.cluster.workers:
            raise ValueError(
                f"link.workers has {len(self.link.workers)} entries but cluster.workers is {self.cluster.workers}: "
                "give one link per worker"
            )
        return self

    @model_validator(mode="after")
    def _straggler_controls_fit(self) -> RunConfig:
        """Late updates folded with a staleness weight and adaptive inner steps are for the averaging protocols
        over a coordinator (diloco, its overlapped CO2 form, sparseloco): others key state by sender."""
        adaptive = getattr(self.protocol, "adaptive_inner_steps", False)
        for name, on in (("cluster.late 'stale'", self.cluster.late == "stale"),
                         ("protocol.adaptive_inner_steps", adaptive)):
            if on and self.protocol.kind not in STRAGGLER_KINDS:
                raise ValueError(f"{name} is for protocol.kind {' or '.join(STRAGGLER_KINDS)}, not "
                                 f"{self.protocol.kind!r}")
            if on and self.cluster.transport not in ("grpc", "inproc"):
                raise ValueError(f"{name} needs a coordinator (cluster.transport 'grpc' or 'inproc'), not "
                                 f"{self.cluster.transport!r}")
        return self

    @model_validator(mode="after")
    def _elastic_fits(self) -> RunConfig:
        """Elastic membership re-deals shards at round boundaries of a coordinator's synchronous rounds, for the
        averaging protocols (others key state by sender, and CO2's overlapped rounds have no boundary at
        which every worker stands)."""
        if not self.cluster.elastic:
            return self
        if self.protocol.kind not in STRAGGLER_KINDS:
            raise ValueError(f"cluster.elastic is for protocol.kind {' or '.join(STRAGGLER_KINDS)}, not "
                             f"{self.protocol.kind!r}")
        if self.cluster.transport not in ("grpc", "inproc"):
            raise ValueError(f"cluster.elastic needs a coordinator (cluster.transport 'grpc' or 'inproc'), not "
                             f"{self.cluster.transport!r}")
        overlap = getattr(self.protocol, "overlap", None)
        if overlap is not None and overlap.enabled:
            raise ValueError("cluster.elastic needs synchronous rounds: set protocol.overlap.enabled false")
        return self

    @property
    def rounds(self) -> int:
        """Outer rounds needed to spend `train.steps` inner steps (the last round may be short)."""
        return -(-self.train.steps // self.inner_steps)

    @property
    def inner_steps(self) -> int:
        """H: inner steps per round (1 for protocols without rounds, such as ddp)."""
        return int(getattr(self.protocol, "inner_steps", 1))


def _describe(err: ValidationError) -> str:
    first = err.errors()[0]
    parts = [str(p) for p in first["loc"]]
    if len(parts) > 1 and parts[0] == "protocol" and parts[1] in ProtocolSettings.registry:
        parts.pop(1)  # pydantic puts the union tag in the path; users never write it
    extra = f" (and {err.error_count() - 1} more problem(s))" if err.error_count() > 1 else ""
    if not parts:  # a whole-config check (the protocol failed to build): its message names the field
        return f"invalid config: {str(first['msg']).removeprefix('Value error, ')}{extra}"
    return f"invalid config at '{'.'.join(parts)}': {first['msg']}{extra}"


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


def with_cluster(cfg: RunConfig, **fields: Any) -> RunConfig:
    """`cfg` with these `cluster` fields replaced (e.g. `token=...`, `device=...`), unvalidated as pydantic's
    `model_copy` is: callers pass values of the field's own type (a generated token, a probed device)."""
    return cfg.model_copy(update={"cluster": cfg.cluster.model_copy(update=fields)})
