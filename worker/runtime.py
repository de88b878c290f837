"""One worker's life in a coordinator-driven run: join, pull, train H steps, push, repeat.

The outer protocol's worker half (`Protocol.make_update`) decides what is sent; this loop only moves
state between the trainer and the coordinator client, reports progress and evaluates the global model.
"""

from __future__ import annotations

import contextlib
import copy
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import yaml

from protocols.config import RunConfig, parse_config
from protocols.registry import build_protocol
from protocols.wire.messages import Phase
from worker.client import CoordinatorClient, StaleRound
from worker.data import load_corpus
from worker.faults import Faults
from worker.model import GPT
from worker.trainer import InnerTrainer

Progress = Callable[[dict[str, Any]], None]


@dataclass
class WorkerResult:
    worker_id: str
    rounds: int = 0
    steps: int = 0
    tokens: int = 0
    final_eval_loss: float | None = None
    bytes_sent: int = 0
    bytes_received: int = 0
    stale_updates: int = 0
    state_hashes: list[str] = field(default_factory=list)
    wall_s: float = 0.0


class _Heartbeat(threading.Thread):
    """Keeps the coordinator from declaring a slow-but-alive worker dead during long inner loops."""

    def __init__(self, client: CoordinatorClient, interval: float, status: dict[str, Any]) -> None:
        super().__init__(daemon=True, name="lowband-heartbeat")
        self.client, self.interval, self.status = client, interval, status
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(self.interval):
            try:
                self.client.heartbeat(self.status.get("step", 0), self.status.get("loss"), None)
            except Exception:
                continue


def run_worker(
    client: CoordinatorClient,
    threads: int = 1,
    progress: Progress | None = None,
    faults: Faults | None = None,
    worker_name: str = "",
) -> WorkerResult:
    """Run until the coordinator says the run is finished. Returns what this worker did."""
    started = time.monotonic()
    torch.set_num_threads(threads)
    joined = client.join(socket.gethostname(), worker_name)
    cfg: RunConfig = parse_config(yaml.safe_load(joined.config_yaml))
    # Beat from now on: building the corpus and model can take longer than the heartbeat timeout.
    status: dict[str, Any] = {"step": 0, "loss": None}
    beat = _Heartbeat(client, joined.heartbeat_interval_s, status)
    beat.start()
    result = WorkerResult(worker_id=joined.worker_id)
    try:
        faults = faults or Faults()
        corpus = load_corpus(cfg.data.eval_fraction, cfg.data.max_chars)
        torch.manual_seed(cfg.seed)  # every worker builds the same initial model
        model = GPT(cfg.model, corpus.tokenizer.vocab_size)
        shard = corpus.shard(joined.worker_index % cfg.cluster.workers, cfg.cluster.workers, cfg.data.split, cfg.seed)
        trainer = InnerTrainer(
            model, shard.sampler(cfg.data.batch_size, cfg.model.block_size), cfg.train, total_steps=cfg.train.steps
        )
        eval_batches = corpus.eval_batches(cfg.data.batch_size, cfg.model.block_size, cfg.train.eval_batches)
        protocol = build_protocol(cfg)
        if not joined.has_global_state:
            client.offer_state(trainer.params())
        worker_state = protocol.init_worker_state(trainer.params())
        h = getattr(cfg.protocol, "inner_steps", 1)
        tokens_per_step = cfg.data.batch_size * cfg.model.block_size
        last_round = -1
        while True:
            info = client.wait_round(last_round)
            if info.phase is Phase.FINISHED:
                break
            if info.phase is not Phase.TRAINING or info.round <= last_round:
                continue  # the long-poll timed out; ask again
            round_, global_ = client.pull()
            result.state_hashes.append(client.last_state_hash)
            trainer.load_params(global_)
            eval_loss = None
            if _eval_due(round_, h, cfg.train.eval_every_steps):
                eval_loss = trainer.evaluate(eval_batches)
            steps = min(h, cfg.train.steps - round_ * h)
            losses = []
            for _ in range(steps):
                faults.before_step(trainer.step_count)
                losses.append(trainer.step())
                status["step"], status["loss"] = trainer.step_count, losses[-1]
            local = trainer.params()
            # Kept so a refused (stale) update leaves error-feedback state as if it was never made.
            state_before = copy.deepcopy(worker_state)
            update, worker_state = protocol.make_update(local, global_, worker_state)
            metrics = {"train_loss": sum(losses) / len(losses), "tokens": float(steps * tokens_per_step)}
            if eval_loss is not None:
                metrics["eval_loss"] = eval_loss
            try:
                client.push(round_, update, metrics)
            except StaleRound:
                result.stale_updates += 1  # the round closed without us (we were a straggler)
                worker_state = state_before
            result.rounds += 1
            result.steps += steps
            result.tokens += steps * tokens_per_step
            last_round = round_
            if progress is not None:
                progress({"worker": joined.worker_id, "round": round_, "step": trainer.step_count, **metrics})
        _, final = client.pull()
        result.state_hashes.append(client.last_state_hash)
        trainer.load_params(final)
        result.final_eval_loss = trainer.evaluate(eval_batches)
        client.heartbeat(trainer.step_count, status.get("loss"), result.final_eval_loss)
    finally:
        beat.stop.set()
        result.bytes_sent, result.bytes_received = client.bytes_sent, client.bytes_received
        result.wall_s = time.monotonic() - started
        # Leaving is best effort: the coordinator times a silent worker out anyway.
        with contextlib.suppress(Exception):
            client.leave()
    return result


def _eval_due(round_: int, inner_steps: int, every: int) -> bool:
    """Evaluate the global model at round 0 and whenever a round start crosses an `every`-step boundary."""
    return round_ == 0 or (round_ * inner_steps) // every != ((round_ - 1) * inner_steps) // every
