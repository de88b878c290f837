"""The `lowband` command line: run, coordinator, worker, status, simulate, sample, export, certs, tokens.

Every error is one line on stderr (never a traceback; `-v` adds it to the log): exit status 2 for a usage or
configuration error (bad argument, bad recipe, missing TLS file), 1 for a failure at run time (a port in use,
a refusing or unreachable coordinator, a corrupt checkpoint)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import pickle
import platform
import signal
import sys
from collections.abc import Callable
from dataclasses import asdict
from importlib.resources import files
from pathlib import Path
from typing import Any

import grpc
from rich.console import Console
from rich.markup import escape

from coordinator.malloc import coordinator_env
from deploy.cli_args import (
    OneLineParser,
    bind_address,
    join_address,
    non_negative_int,
    positive_float,
    positive_int,
    read_pem,
    readable_file,
)
from deploy.memory import tune_this_process
from protocols.config import GOSSIP, ConfigError, RunConfig, apply_overrides, load_config, parse_config, with_cluster

DEFAULT_RECIPE = "diloco.yaml"


def recipe_path(recipe: str | None) -> Path:
    """A recipe file path, or the name of a recipe shipped in deploy/recipes (with or without .yaml)."""
    if recipe is None:
        recipe = DEFAULT_RECIPE
    path = Path(recipe)
    if path.is_file():
        return path
    shipped = files("deploy") / "recipes" / (recipe if recipe.endswith(".yaml") else f"{recipe}.yaml")
    if shipped.is_file():
        return Path(str(shipped))
    known = sorted(p.name for p in (files("deploy") / "recipes").iterdir() if p.name.endswith(".yaml"))
    raise ConfigError(f"recipe {recipe!r} is neither a file nor a shipped recipe (shipped: {', '.join(known)})")


def _load(args: argparse.Namespace) -> RunConfig:
    overrides = list(args.set)
    if args.init_from is not None:
        overrides.append(f"init_from={json.dumps(args.init_from)}")
    path = recipe_path(args.recipe)
    _check_text(path)
    cfg = load_config(path, overrides)
    # Paths resolved here, where the user typed them: workers (Ray actors, other processes) may run elsewhere.
    if cfg.init_from is not None:
        from worker.models import checkpoint_path

        checkpoint_path(cfg.init_from)  # a missing checkpoint fails here, before anything starts
        cfg = cfg.model_copy(update={"init_from": str(Path(cfg.init_from).resolve())})
    if cfg.model.path is not None:
        model = cfg.model.model_copy(update={"path": str(Path(cfg.model.path).resolve())})
        cfg = cfg.model_copy(update={"model": model})
    return cfg


def _check_text(path: Path) -> None:
    """ConfigError unless the recipe is UTF-8 text (a binary file would fail deep inside the YAML reader)."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"recipe {str(path)!r} cannot be read: {err.strerror or err}") from None
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"recipe {str(path)!r} is not a text (UTF-8 YAML) file") from None
    if b"\0" in data:
        raise ConfigError(f"recipe {str(path)!r} is not a text (YAML) file: it holds NUL bytes")


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", nargs="?", help=f"recipe YAML path or shipped recipe name (default {DEFAULT_RECIPE})")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field with a dotted key, e.g. --set protocol.inner_steps=30")
    p.add_argument("--init-from", default=None, metavar="RUN",
                   help="start from a finished run's weights (its directory or checkpoint file; a run trained with "
                        "adapters: its `lowband export` directory); same as --set init_from=RUN")


def cmd_run(args: argparse.Namespace, console: Console) -> int:
    from deploy.launcher import LaunchError, run
    from deploy.report import plot_compare, print_final

    cfg = _load(args)
    try:
        summaries = [run(cfg, address=args.address, console=console)]
        if args.compare == "ddp":
            ddp_cfg = RunConfig.model_validate({**cfg.model_dump(), "name": f"{cfg.name}-ddp",
                                                "protocol": {"kind": "ddp"}})
            summaries.insert(0, run(ddp_cfg, address=args.address, console=console))
    except LaunchError as err:
        console.print(f"[red]error:[/red] {err}", highlight=False)
        return 1
    print_final(summaries, console)
    if len(summaries) > 1:
        compared = plot_compare(summaries, Path(summaries[-1]["run_dir"]) / "compare.png")
        console.print(f"both runs in one plot: {compared}")
    console.print(f"run directory: {summaries[-1]['run_dir']}")
    return 0


def _read_tls(cert: str | None, key: str | None, client_ca: str | None = None
              ) -> tuple[bytes, bytes] | tuple[bytes, bytes, bytes] | None:
    """The coordinator's (certificate chain, key[, CA its workers' client certificates must come from])."""
    if not cert and not key:
        if client_ca:
            raise ConfigError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
        return None
    if not (cert and key):
        raise ConfigError("--tls-cert and --tls-key must be given together")
    chain, private = read_pem(cert, "--tls-cert"), read_pem(key, "--tls-key")
    assert chain is not None and private is not None
    ca = read_pem(client_ca, "--tls-client-ca")
    return (chain, private) if ca is None else (chain, private, ca)


def _client_tls(args: argparse.Namespace) -> dict[str, Any]:
    """A worker's TLS arguments for `CoordinatorClient`: the CA that signed the coordinator, and the client
    certificate and key it shows a coordinator that requires one (mutual TLS)."""
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ConfigError("--tls-cert and --tls-key must be given together")
    if args.tls_cert and not args.tls_ca:
        raise ConfigError("--tls-cert/--tls-key (a client certificate) need --tls-ca (TLS to the coordinator)")
    client = None
    if args.tls_cert:
        client = (read_pem(args.tls_cert, "--tls-cert"), read_pem(args.tls_key, "--tls-key"))
    return {"tls_ca": read_pem(args.tls_ca, "--tls-ca"), "tls_client": client}


def _coordinator_config(args: argparse.Namespace) -> tuple[RunConfig, Any]:
    """The run's config and, with --resume, the checked checkpoint to continue from. Without a recipe a resume
    takes the checkpoint's own config (token removed: --token gives it again), --set overrides applied; with
    one, the recipe must match the checkpoint. Every refusal is one ConfigError line, before anything is
    written."""
    from coordinator.checkpoint import check_resume_point, read_resume_point

    point = read_resume_point(args.resume) if args.resume else None
    if point is not None and args.recipe is None:
        if args.init_from is not None:
            raise ConfigError("--init-from starts a new run; --resume continues one: drop one of them")
        cfg = parse_config(apply_overrides(point.checkpoint["config"], list(args.set)))
    else:
        cfg = _load(args)
    token = _coordinator_token(args)
    if token:
        cfg = with_cluster(cfg, token=token)
    if point is not None:
        check_resume_point(point, cfg)
    return cfg, point


def _coordinator_token(args: argparse.Namespace) -> str:
    """The run token given to `lowband coordinator`: --token, or the single token of --token-file."""
    from deploy.tokens import token_from_file

    if args.token_file is None:
        return str(args.token)
    if args.token:
        raise ConfigError("--token and --token-file both give the run's token: drop one of them")
    return token_from_file(Path(args.token_file), "")


def _required_token(cfg: RunConfig, worker_tokens: object) -> tuple[RunConfig, str]:
    """A token is required (issue 12): a run started with neither a token nor worker tokens gets a fresh random
    one. Returns the config that holds it and the generated token ("" when one was given), to be shown once."""
    from coordinator.sessions import new_run_token

    if cfg.cluster.token or worker_tokens:
        return cfg, ""
    token = new_run_token()
    return with_cluster(cfg, token=token), token


def cmd_coordinator(args: argparse.Namespace, console: Console) -> int:
    from coordinator.server import CoordinatorServer
    from deploy.report import plot_utilization, round_line
    from deploy.tokens import read_worker_tokens

    cfg, point = _coordinator_config(args)
    run_dir = point.run_dir if point is not None else Path(cfg.run_dir) / cfg.name
    if cfg.protocol.kind == GOSSIP:
        return _serve_rendezvous(cfg, args, run_dir, console)
    worker_tokens = read_worker_tokens(Path(args.worker_tokens)) if args.worker_tokens else None
    cfg, generated = _required_token(cfg, worker_tokens)
    server = CoordinatorServer(cfg, bind=args.bind, run_dir=run_dir, resume=point,
                               tls=_read_tls(args.tls_cert, args.tls_key, args.tls_client_ca),
                               worker_tokens=worker_tokens).start()
    rounds = server.state.total_rounds
    server.round_listeners.append(
        lambda record: console.print(round_line(asdict(record), rounds), highlight=False, soft_wrap=True))
    what = f"coordinator for run [bold]{server.state.run_id}[/bold]"
    if point is not None:
        what += f" (resumed at round {point.round} of {rounds} from {point.path})"
    return _serve_until_finished(server, what, cfg, args, console, plot_utilization, generated)


class _Terminated(Exception):
    """SIGTERM arrived: stop at the last recorded round."""


def _raise_terminated(*_: object) -> None:
    raise _Terminated


def _serve_until_finished(server: Any, what: str, cfg: RunConfig, args: argparse.Namespace, console: Console,
                          plot: Callable[[Path], object], generated_token: str = "") -> int:
    """Announce `server`, wait until its run finished and its workers left, then write the summary and plots
    (`plot`: the run kind's own, beside loss.png) and print the final table. A `generated_token` is shown
    here, once: it is nowhere else (never in the run directory)."""
    from deploy.report import plot_loss, print_final

    if args.address_file:
        Path(args.address_file).write_text(server.address + "\n")
    console.print(f"{what} listening on {server.address}; waiting for {cfg.cluster.workers} workers")
    if generated_token:
        console.print(f"no --token given, so this run's token is {generated_token} (shown only here): start each "
                      f"worker with `lowband worker --join {server.address} --token {generated_token}`",
                      highlight=False, soft_wrap=True)
    signal.signal(signal.SIGTERM, _raise_terminated)
    stopped_by = None
    try:
        server.wait_finished()
        server.wait_departed(120.0)
    except _Terminated:
        stopped_by = "SIGTERM"
    except KeyboardInterrupt:
        stopped_by = "SIGINT"
    # Stopping: a second signal must not cut the summary short. The checkpoint being written (if any) is
    # finished, then no round is recorded any more: the run directory holds whole rounds only.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if stopped_by is not None and hasattr(server, "halt"):
        server.halt()
    server.stop()
    summary = server.summary()
    if stopped_by is not None:
        summary["stopped_by"] = stopped_by
    if server.run_dir is not None:
        server.run_dir.write_summary(summary)
        plot_loss(server.run_dir.path, summary)
        plot(server.run_dir.path)
    print_final([summary], console)
    if stopped_by is None:
        return 0
    print(f"lowband coordinator: stopped by {stopped_by}; {_stopped_at(server, summary, cfg)}", file=sys.stderr)
    return 143 if stopped_by == "SIGTERM" else 130


def _stopped_at(server: Any, summary: dict[str, Any], cfg: RunConfig) -> str:
    """What a stopped coordinator left behind, and how to continue."""
    where, rounds = server.run_dir.path if server.run_dir is not None else None, summary.get("rounds") or 0
    if where is None:
        return f"{rounds} of {cfg.rounds} rounds done, nothing written"
    if not hasattr(server, "halt"):  # a gossip rendezvous keeps no checkpoint
        return f"{rounds} of {cfg.rounds} rounds done; summary.json written in {where}"
    if rounds >= cfg.rounds:
        return f"the run had finished all {cfg.rounds} rounds; summary.json written in {where}"
    if not (where / "checkpoint.pt").is_file():
        return f"no round closed, nothing to resume; summary.json written in {where}"
    token = " --token ..." if cfg.cluster.token else ""
    return (f"{rounds} of {cfg.rounds} rounds recorded; checkpoint and summary.json in {where}; continue it with "
            f"`lowband coordinator --resume {where}{token}`")


def _serve_rendezvous(cfg: RunConfig, args: argparse.Namespace, run_dir: Path, console: Console) -> int:
    """`lowband coordinator` for a gossip run: only the rendezvous (the models go worker to worker)."""
    from coordinator.rendezvous_server import RendezvousServer
    from deploy.report import plot_consensus

    if cfg.cluster.transport != "p2p":
        raise ConfigError(f"a gossip run over cluster.transport {cfg.cluster.transport!r} runs in one process "
                          f"(`lowband run`); `lowband coordinator` serves the rendezvous of transport 'p2p'")
    if args.resume or args.tls_cert or args.tls_key or args.tls_client_ca or args.worker_tokens:
        raise ConfigError("a gossip run's rendezvous holds no state to resume, serves no TLS and takes the run's "
                          "token only: drop --resume, --tls-cert, --tls-key, --tls-client-ca and --worker-tokens")
    cfg, generated = _required_token(cfg, None)
    server = RendezvousServer(cfg, bind=args.bind, run_dir=run_dir).start()
    what = f"rendezvous for gossip run [bold]{server.rendezvous.run_id}[/bold]"
    return _serve_until_finished(server, what, cfg, args, console, plot_consensus, generated)


def cmd_worker(args: argparse.Namespace, console: Console) -> int:
    from worker.client import CoordinatorClient
    from worker.faults import Faults
    from worker.runners import run_grpc_worker

    args.token = _worker_token(args)
    client = CoordinatorClient(args.join, token=args.token, retry_for_s=args.retry_for, **_client_tls(args))

    def show(event: dict[str, Any]) -> None:
        ev = f", eval {event['eval_loss']:.3f}" if "eval_loss" in event else ""
        console.print(f"{event['worker']} round {event['round']} step {event['step']}: "
                      f"train {event['train_loss']:.3f}{ev}")

    faults = Faults(step_delay_s=args.step_delay, crash_at_step=args.crash_at_step,
                    corrupt_replica_at_round=args.corrupt_replica_at_round)
    try:
        result = run_grpc_worker(client, threads=args.threads, progress=show, faults=faults, worker_name=args.name)
    except grpc.RpcError as err:
        # UNIMPLEMENTED before any join succeeded: the server is no star coordinator. A gossip run's coordinator
        # serves only the Rendezvous service; nothing was joined, so nothing is left behind on it.
        if err.code() is not grpc.StatusCode.UNIMPLEMENTED or client.run_id:
            raise
        client.close()
        return _gossip_worker(args, console)
    client.close()
    if args.result_json:
        Path(args.result_json).write_text(json.dumps(asdict(result), indent=2) + "\n")
    console.print(f"{result.worker_id}: {result.rounds} rounds, {result.steps} steps, final eval loss "
                  f"{result.final_eval_loss}, sent {result.bytes_sent} B, received {result.bytes_received} B, "
                  f"{result.resyncs} resyncs")
    return 0


def _worker_token(args: argparse.Namespace) -> str:
    """The token a worker joins with: --token, or its line of --token-file (deploy/tokens.py)."""
    from deploy.tokens import token_from_file

    if args.token_file is None:
        return str(args.token)
    if args.token:
        raise ConfigError("--token and --token-file both give the worker's token: drop one of them")
    return token_from_file(Path(args.token_file), args.name)


def _gossip_worker(args: argparse.Namespace, console: Console) -> int:
    """`lowband worker` in a gossip run: serve the Peer service, enroll with the rendezvous, gossip."""
    from worker.runners import run_p2p_worker

    if args.tls_ca or args.tls_cert:
        raise ConfigError("a gossip run's rendezvous and peer links carry no TLS (peers authenticate by the run's peer "
                          "token): drop --tls-ca, --tls-cert and --tls-key")
    if args.step_delay or args.crash_at_step >= 0 or args.corrupt_replica_at_round >= 0:
        raise ConfigError("--step-delay, --crash-at-step and --corrupt-replica-at-round apply to coordinated runs; "
                          "this coordinator runs a gossip run")
    result = run_p2p_worker(args.join, token=args.token, threads=args.threads, worker_name=args.name,
                            bind=args.peer_bind, advertise=args.peer_advertise, retry_for_s=args.retry_for)
    fields = asdict(result)
    if args.result_json:
        Path(args.result_json).write_text(json.dumps(fields, indent=2, default=str) + "\n")
    shown = ", ".join(f"{k} {fields[k]}" for k in ("rounds", "steps", "final_eval_loss", "bytes_sent",
                                                    "bytes_received") if k in fields)
    console.print(f"gossip worker {fields.get('worker_id', fields.get('index', ''))}: {shown}")
    return 0


def cmd_sample(args: argparse.Namespace, console: Console) -> int:
    from deploy.sampling import sample_run

    console.print(sample_run(Path(args.run_dir), args.prompt, args.tokens, args.temperature, args.top_k, args.seed),
                  markup=False, highlight=False)
    return 0


def cmd_simulate(args: argparse.Namespace, console: Console) -> int:
    import torch

    from deploy.simulate import simulate

    # The pool's workers are threads: one intra-op thread each keeps small client models from thrashing the cores.
    torch.set_num_threads(1)
    cfg = _load(args)
    summary = simulate(cfg, console)
    shown = ", ".join(f"{k} {summary[k]:.4g}" for k in ("final_eval_loss", "final_accuracy", "dp_epsilon_max")
                      if summary.get(k) is not None)
    console.print(f"{summary['rounds']} rounds, {summary['client_updates']} client updates in "
                  f"{summary['messages']} messages, {summary['wall_s']:.1f}s: {shown}", highlight=False)
    console.print(f"run directory: {summary['run_dir']}")
    return 0


def cmd_export(args: argparse.Namespace, console: Console) -> int:
    from deploy.export import export_run

    out = export_run(Path(args.run_dir), Path(args.out) if args.out else None)
    console.print(f"exported {args.run_dir} (adapters merged) to {out}: sample it with `lowband sample {out}`, "
                  f"or start a run from it with --init-from {out}", highlight=False)
    return 0


def cmd_tokens(args: argparse.Namespace, console: Console) -> int:
    from deploy.tokens import make_worker_tokens, write_worker_tokens

    tokens = make_worker_tokens(args.workers, args.prefix)
    write_worker_tokens(Path(args.out), tokens)
    console.print(f"wrote {len(tokens)} worker tokens ({', '.join(tokens)}) to {args.out} (mode 0600): start the "
                  f"coordinator with --worker-tokens {args.out}; give each worker its own line and "
                  f"`lowband worker --name NAME --token-file FILE`", highlight=False)
    return 0


def cmd_certs(args: argparse.Namespace, console: Console) -> int:
    from deploy.certs import make_certs

    written = make_certs(Path(args.out_dir), args.host, args.client, args.days)
    console.print(f"wrote {', '.join(p.name for p in written)} to {args.out_dir}: start the coordinator with "
                  f"--tls-cert server.pem --tls-key server.key (and --tls-client-ca ca.pem for mutual TLS); "
                  f"give workers --tls-ca ca.pem", highlight=False)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="lowband", description="Train PyTorch models across machines joined by slow, unreliable links.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run a recipe on a local Ray cluster (or join one with --address)")
    _add_config_args(p)
    p.add_argument("--address", default=None, help="address of an existing Ray cluster (default: start one)")
    p.add_argument("--compare", choices=["ddp"], default=None,
                   help="also run the DDP baseline on the same token budget and compare")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("coordinator", help="run the coordinator as a plain process (no Ray)")
    _add_config_args(p)
    p.add_argument("--bind", default="127.0.0.1:7070", type=bind_address,
                   help="HOST:PORT to listen on (port 0 picks a free one)")
    p.add_argument("--token", default="", help="shared secret workers must present (without it, nor --token-file "
                                                "nor --worker-tokens, a random one is made and printed once)")
    p.add_argument("--token-file", default=None, type=readable_file, metavar="FILE",
                   help="read the run's token from FILE (its single token; mode 0600), keeping it out of `ps`")
    p.add_argument("--resume", default=None, metavar="RUN_DIR",
                   help="continue a run from its run directory (or its checkpoint.pt): same run id, workers "
                        "rejoin; without RECIPE the checkpoint's own config is used (give --token again)")
    p.add_argument("--worker-tokens", default=None, type=readable_file, metavar="FILE",
                   help="admit each worker only with its own token, under its own name (lines `NAME TOKEN`, "
                        "mode 0600; `lowband tokens` writes one); --token then admits no worker, only status")
    p.add_argument("--tls-cert", default=None, type=readable_file,
                   help="PEM certificate chain (enables TLS with --tls-key; `lowband certs` makes one)")
    p.add_argument("--tls-key", default=None, type=readable_file, help="PEM private key")
    p.add_argument("--tls-client-ca", default=None, type=readable_file,
                   help="PEM CA certificate: require every worker to show a client certificate it signed (mutual TLS)")
    p.add_argument("--address-file", default=None, help="write the bound HOST:PORT here once listening")
    p.set_defaults(func=cmd_coordinator)

    p = sub.add_parser("worker", help="join a coordinator as a worker (no Ray)")
    p.add_argument("--join", required=True, metavar="HOST:PORT", type=join_address,
                   help="the coordinator's address (port 1..65535)")
    p.add_argument("--token", default="", help="the coordinator's shared secret (or this worker's own token)")
    p.add_argument("--token-file", default=None, type=readable_file, metavar="FILE",
                   help="read the token from FILE: its single token, or the line of --name in a worker-token file")
    p.add_argument("--name", default="", help="worker id to ask for (default: the coordinator assigns one)")
    p.add_argument("--threads", type=positive_int, default=1, help="torch threads for this worker")
    p.add_argument("--tls-ca", default=None, type=readable_file,
                   help="PEM root certificate to verify the coordinator (enables TLS)")
    p.add_argument("--tls-cert", default=None, type=readable_file,
                   help="PEM client certificate for a coordinator that requires one (mutual TLS; with --tls-key)")
    p.add_argument("--tls-key", default=None, type=readable_file, help="PEM private key of --tls-cert")
    p.add_argument("--retry-for", type=float, default=60.0, help="seconds to keep retrying an unreachable coordinator")
    p.add_argument("--step-delay", type=float, default=0.0, help="seconds added to every step (simulate a straggler)")
    p.add_argument("--crash-at-step", type=int, default=-1, help="SIGKILL this worker at that step (fault injection)")
    p.add_argument("--corrupt-replica-at-round", type=int, default=-1, metavar="R",
                   help="flip one parameter of the replica after round R (fault injection: the worker must resync)")
    p.add_argument("--result-json", default=None, help="write this worker's result (rounds, bytes, hashes) here")
    p.add_argument("--peer-bind", default="127.0.0.1:0", type=bind_address,
                   help="gossip runs: HOST:PORT this worker's Peer service listens on (port 0 picks a free one)")
    p.add_argument("--peer-advertise", default=None,
                   help="gossip runs: the HOST (or HOST:PORT) peers dial to reach this worker (default: the bind host)")
    p.set_defaults(func=cmd_worker)

    from deploy.status import add_parser as add_status_parser

    add_status_parser(sub)

    p = sub.add_parser("simulate", help="simulate federated clients (100 to 10,000) as state in one process")
    _add_config_args(p)
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("sample", help="print text generated by a trained run's final checkpoint")
    p.add_argument("run_dir", help="a run directory, e.g. runs/diloco")
    p.add_argument("--prompt", default="ROMEO:", help="text to start from")
    p.add_argument("--tokens", type=positive_int, default=300, help="characters to generate (>= 1)")
    p.add_argument("--temperature", type=positive_float, default=0.8, help="sampling temperature (> 0)")
    p.add_argument("--top-k", type=positive_int, default=20, help="sample among the k likeliest characters (>= 1)")
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("export", help="write a finished run as a plain checkpoint, low-rank adapters merged")
    p.add_argument("run_dir", help="a run directory, e.g. runs/lora-finetune")
    p.add_argument("--out", default=None, help="directory to write (default RUN_DIR/export)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("certs", help="make a CA, a server certificate (and a client one) for a run's TLS")
    p.add_argument("out_dir", help="directory to write ca.pem/.key, server.pem/.key (and CLIENT.pem/.key) into")
    p.add_argument("--host", action="append", default=None, metavar="NAME",
                   help="a host name or IP the coordinator is reached by (repeat; default: localhost and 127.0.0.1)")
    p.add_argument("--client", default=None, metavar="NAME",
                   help="also make a client certificate NAME.pem/.key for a worker (mutual TLS)")
    p.add_argument("--days", type=positive_int, default=365, help="validity in days")
    p.set_defaults(func=cmd_certs)

    p = sub.add_parser("tokens", help="make per-worker tokens for `lowband coordinator --worker-tokens`")
    p.add_argument("--workers", type=positive_int, required=True, help="how many workers (names PREFIX0..)")
    p.add_argument("--out", required=True, metavar="FILE", help="file to create (mode 0600; never overwritten)")
    p.add_argument("--prefix", default="w", help="worker names are PREFIX0, PREFIX1, ... (default w: the ids the "
                                                   "coordinator gives)")
    p.set_defaults(func=cmd_tokens)
    return parser


def _start_again_with_coordinator_env() -> None:
    """Start this process again (same pid, arguments and descriptors) with the allocator environment a coordinator
    can only take as it starts (coordinator/malloc.py `coordinator_env`); returns when there is nothing to add."""
    missing = coordinator_env()
    if not missing or platform.system() != "Linux":
        return
    try:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], {**os.environ, **missing})
    except OSError as err:  # serve as we are: only the memory differs
        logging.getLogger("lowband").warning("could not restart with %s (%s); going on without", missing, err)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command != "coordinator":
        tune_this_process()  # before anything allocates tensors (the coordinator tunes its own: coordinator/malloc.py)
    elif argv is None:  # the command line, not a caller in this process
        _start_again_with_coordinator_env()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    console = Console()
    try:
        return int(args.func(args, console))
    except ConfigError as err:
        return _fail(console, str(err), 2)
    except grpc.RpcError as err:  # the coordinator refused us, or could not be reached in time
        return _fail(console, f"coordinator said {err.code().name}: {err.details()}", 1)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/yellow]")
        return 130
    except Exception as err:  # one line for the user; the traceback only with -v
        logging.getLogger("lowband").debug("traceback", exc_info=err)
        return _fail(console, runtime_error_line(err, args), 1)


def runtime_error_line(err: Exception, args: argparse.Namespace) -> str:
    """The one line that explains a failure at run time."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if isinstance(err, RuntimeError) and text.startswith("Failed to bind to address"):
        where = getattr(args, "bind", None) or getattr(args, "peer_bind", "")
        return (f"cannot listen on {where}: the port is in use, or the address is not one of this machine's "
                "(--bind HOST:PORT; port 0 picks a free one)")
    if isinstance(err, (pickle.UnpicklingError, EOFError)) or "PytorchStreamReader" in text or "zip archive" in text:
        named = [str(v) for k in ("resume", "run_dir", "init_from") if (v := getattr(args, k, None))]
        which = f" ({' / '.join(named)})" if named else ""
        return (f"the checkpoint{which} is corrupt, truncated or not a lowband checkpoint "
                f"({type(err).__name__}: {text})")
    if isinstance(err, OSError) and err.filename is not None:
        return f"{err.filename}: {err.strerror or text}"
    return f"{type(err).__name__}: {text} (run with -v for the traceback)"


def _fail(console: Console, message: str, status: int) -> int:
    line = " ".join(message.split())
    Console(stderr=True, soft_wrap=True).print(f"[red]error:[/red] {escape(line)}", highlight=False)
    del console
    return status


if __name__ == "__main__":
    sys.exit(main())
