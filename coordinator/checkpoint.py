"""The coordinator's checkpoint: what a restarted coordinator needs to continue the same run.

After every round `RunDir.save_checkpoint` writes `checkpoint.pt` atomically (temp file, fsync, rename,
fsync of the directory): the replica (global parameters, outer momentum, downlink receiver shift), the
aggregator's own state (per-worker shifts), the downlink's error-feedback state, the round, the run id,
the membership (worker id -> shard index and counters), the record of the round just closed, the wall
time so far, and the run's config with its token removed (`redacted`). The token never reaches the run
directory; `token_required` only says that one must be given again (`worker_tokens_required` the same of the
per-worker tokens, coordinator/sessions.py).

`load_resume_point` reads it for `lowband coordinator --resume` and refuses, with one line and before
anything is written, a path that does not exist, a file that is not a coordinator checkpoint, a
checkpoint whose config differs from the run's (`config_difference`), a finished run, and a run started
with a token when none is given.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from protocols.config import ConfigError, RunConfig, with_cluster
from protocols.handshake import OPERATIONAL_FIELDS, flatten


def redacted(cfg: RunConfig) -> RunConfig:
    """The config without its token: what a run directory, a checkpoint or a worker may be given."""
    return with_cluster(cfg, token="")


def atomic_write(path: Path, write: Any) -> None:
    """`write(file)` into a temp file beside `path`, fsync, rename over `path`, fsync the directory: a crash
    at any point leaves either the old file or the new one, never a torn one."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def config_difference(saved: dict[str, Any], cfg: RunConfig) -> str | None:
    """None when `cfg` may continue the run whose checkpoint holds `saved` (its `model_dump(mode="json")`);
    else one line naming the differing fields (the first three, with both values)."""
    old, new = flatten(saved), flatten(cfg.model_dump(mode="json"))
    differing = sorted(k for k in old.keys() | new.keys()
                       if k not in OPERATIONAL_FIELDS and old.get(k, "<absent>") != new.get(k, "<absent>"))
    if not differing:
        return None
    # A section of another kind differs in every field: its kind says it all.
    kinds = [k.removesuffix("kind") for k in differing if k.endswith(".kind")]
    differing = [k for k in differing if k.endswith(".kind") or not any(k.startswith(p) for p in kinds)]
    shown = ", ".join(f"{k} is {new.get(k, '<absent>')!r} in the config but {old.get(k, '<absent>')!r} in the "
                      f"checkpoint" for k in differing[:3])
    more = f" (and {len(differing) - 3} more: {', '.join(differing[3:])})" if len(differing) > 3 else ""
    return shown + more


def state_digest(obj: Any) -> str:
    """sha256 over a state's structure and every tensor's dtype, shape and bytes: equal digests mean
    bit-identical aggregator or error-feedback state (dicts, sequences, dataclasses and plain objects)."""
    h = hashlib.sha256(b"lowband-obj-v1\0")

    def walk(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous().reshape(-1)
            h.update(f"T{x.dtype}{tuple(x.shape)}\0".encode())
            h.update(t.view(torch.uint8).numpy().tobytes())
        elif isinstance(x, dict):
            h.update(f"D{len(x)}\0".encode())
            for key in sorted(x, key=repr):
                h.update(f"{key!r}\0".encode())
                walk(x[key])
        elif isinstance(x, (list, tuple, set, frozenset)):
            items = sorted(x, key=repr) if isinstance(x, (set, frozenset)) else list(x)
            h.update(f"L{len(items)}\0".encode())
            for item in items:
                walk(item)
        elif dataclasses.is_dataclass(x) and not isinstance(x, type):
            h.update(f"C{type(x).__name__}\0".encode())
            walk({f.name: getattr(x, f.name) for f in dataclasses.fields(x)})
        elif x is None or isinstance(x, (bool, int, float, str, bytes)):
            h.update(f"V{x!r}\0".encode())
        elif hasattr(x, "__dict__"):
            h.update(f"O{type(x).__name__}\0".encode())
            walk(vars(x))
        else:
            h.update(f"R{x!r}\0".encode())

    walk(obj)
    return h.hexdigest()


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by `RunDir.save_checkpoint` (our own file, so full unpickling is fine)."""
    ckpt: dict[str, Any] = torch.load(Path(path), map_location="cpu", weights_only=False)
    for key in ("round", "params"):
        if key not in ckpt:
            raise ValueError(f"{path}: not a lowband checkpoint (no {key!r})")
    return ckpt


@dataclass(frozen=True)
class ResumePoint:
    """A checked checkpoint to continue from, and the run directory it belongs to."""

    path: Path
    run_dir: Path
    checkpoint: dict[str, Any]

    @property
    def round(self) -> int:
        return int(self.checkpoint["round"])

    @property
    def run_id(self) -> str:
        return str(self.checkpoint["run_id"])


def checkpoint_file(resume: str | Path) -> Path:
    """`--resume`'s checkpoint: the path itself, or RUN_DIR/checkpoint.pt; ConfigError when neither exists."""
    path = Path(resume)
    if path.is_dir():
        path = path / "checkpoint.pt"
        if not path.is_file():
            raise ConfigError(f"--resume {str(resume)!r}: the directory holds no checkpoint.pt (a run directory "
                              f"gets one when its first round closes)")
    elif not path.is_file():
        raise ConfigError(f"--resume {str(resume)!r}: no such file or directory")
    return path


def read_resume_point(resume: str | Path) -> ResumePoint:
    """The checkpoint at `resume`, read but not yet checked against a config; ConfigError when it is missing
    or not a coordinator checkpoint of this version of lowband."""
    path = checkpoint_file(resume)
    try:
        ckpt = load_checkpoint(path)
    except Exception as err:  # a torn, foreign or corrupt file: say which and why, in one line
        raise ConfigError(f"--resume {str(path)!r}: not a readable lowband checkpoint "
                          f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None
    if "replica" not in ckpt:
        raise ConfigError(f"--resume {str(path)!r}: not a coordinator checkpoint (no replica; a DDP or all-gather "
                          f"run's cannot resume)")
    if "config" not in ckpt or "members" not in ckpt:
        raise ConfigError(f"--resume {str(path)!r}: written by an older lowband (no config or membership): it "
                          f"cannot be checked against this run")
    return ResumePoint(path, path.parent, ckpt)


def check_resume_point(point: ResumePoint, cfg: RunConfig) -> None:
    """ConfigError (one line) unless `cfg` may continue `point`: same config where it matters, rounds left,
    a token when the run had one."""
    where = f"--resume {str(point.path)!r}"
    differs = config_difference(point.checkpoint["config"], cfg)
    if differs is not None:
        raise ConfigError(f"{where} does not match the config: {differs}")
    if point.round >= cfg.rounds:
        raise ConfigError(f"{where}: run {point.run_id} already finished ({point.round} of {cfg.rounds} rounds); "
                          f"nothing to resume, its summary.json is left as it is")
    if point.checkpoint.get("token_required") and not cfg.cluster.token:
        raise ConfigError(f"{where}: run {point.run_id} was started with a token; give it again with --token "
                          f"(run directories never store it)")


def check_worker_tokens(point: ResumePoint, given: bool) -> None:
    """ConfigError (one line) when the run admitted workers by their own tokens and none are given now: the
    resumed coordinator would let anyone with the run's token join as any of them."""
    if point.checkpoint.get("worker_tokens_required") and not given:
        raise ConfigError(f"--resume {str(point.path)!r}: run {point.run_id} admitted workers by their own tokens; "
                          f"give the file again with --worker-tokens (run directories never store them)")


def load_resume_point(resume: str | Path, cfg: RunConfig) -> ResumePoint:
    """`read_resume_point` then `check_resume_point`."""
    point = read_resume_point(resume)
    check_resume_point(point, cfg)
    return point
